"""The HTTP/1.1 protocol with a deadline for receiving a whole request (slow clients get 408).

Who calls: ``serving.cli.serve_app`` runs the app with ``protocol=DeadlineHttpProtocol``.

Why: Sanic's ``REQUEST_TIMEOUT`` counts from the last byte received, and only until the head is
parsed; the body then falls under ``RESPONSE_TIMEOUT`` (an hour here). A client trickling one byte
a second (slowloris) would hold its connection, and its slot, forever. Here the head *and* the
body must arrive within ``--request-timeout`` of the request's first byte; past it the client
gets 408 and the connection closes. The check runs on Sanic's own timer (every half of the
smallest timeout), so a deadline may be overrun by that much.
"""

from __future__ import annotations

from typing import Any

from sanic.exceptions import RequestTimeout
from sanic.http import Stage
from sanic.server.protocols.http_protocol import HttpProtocol


def _receiving(http: Any) -> bool:
    """The request's head or body is still on its way."""
    return bool(http.stage is Stage.REQUEST or (http.stage is Stage.HANDLER and http.request_body))


class DeadlineHttpProtocol(HttpProtocol):
    """``HttpProtocol`` whose request timeout is a deadline for the whole request."""

    __slots__ = ("_receiving_since",)  # the base classes use slots

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._receiving_since: float | None = None  # set first: the base class checks timeouts
        super().__init__(*args, **kwargs)

    def data_received(self, data: bytes) -> None:
        http = getattr(self, "_http", None)
        if self._receiving_since is None or (http is not None and http.stage is Stage.IDLE):
            self._receiving_since = self.loop.time()  # the first byte of a new request
        super().data_received(data)

    def check_timeouts(self) -> None:
        http = getattr(self, "_http", None)
        if self._task and http is not None:
            now = self.loop.time()
            if _receiving(http):
                if self._receiving_since is None:
                    self._receiving_since = now
                elif now - self._receiving_since > self.request_timeout:
                    http.exception = RequestTimeout("Request Timeout")
                    self._task.cancel("the client did not send its request in time")
                    return
            elif http.stage is not Stage.IDLE:
                self._receiving_since = None  # received; the handler or response runs
        super().check_timeouts()
