"""Server-sent events for streamed completions: ``data: <json>\\n\\n`` lines, then ``[DONE]``.

An error after the 200 status line was sent cannot change the status any more: it is sent as an
event ``data: {"error": {...}}`` and the stream then ends cleanly with ``data: [DONE]``.
"""

from __future__ import annotations

import json
from typing import Any

from sanic import Request

from serving.api.errors import error_body

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

# Code points that str.splitlines() breaks at and that JSON leaves raw inside strings.
_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


class SSEWriter:
    def __init__(self, request: Request) -> None:
        self.request = request
        self.response: Any = None  # sanic.HTTPResponse once open() ran

    async def open(self) -> None:
        self.response = await self.request.respond(content_type="text/event-stream",
                                                   headers=dict(SSE_HEADERS))

    async def send(self, payload: str) -> None:
        """``payload``: one JSON document. Its U+0085, U+2028 and U+2029 (legal raw in JSON
        strings, and SSE ends lines only at CR / LF) are escaped all the same: line readers
        built on ``str.splitlines`` (httpx's ``aiter_lines``) split the event there."""
        assert self.response is not None
        await self.response.send(f"data: {payload.translate(_LINE_BREAKS)}\n\n")

    async def error(self, status: int, message: str) -> None:
        await self.send(json.dumps(error_body(message, status)))

    async def done(self) -> None:
        assert self.response is not None
        await self.response.send("data: [DONE]\n\n")
        await self.response.eof()
