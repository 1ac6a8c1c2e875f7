"""Helpers the route modules share: JSON responses, request ids, output accumulation."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from sanic import HTTPResponse, Request

from serving.api.admission import Overloaded
from serving.api.state import ServerState
from serving.engine.outputs import TokenLogprob


def state_of(request: Request) -> ServerState:
    state: ServerState = request.app.ctx.state
    return state


def json_response(model: BaseModel, status: int = 200) -> HTTPResponse:
    return HTTPResponse(model.model_dump_json(), status=status, content_type="application/json")


def request_id_for(request: Request, body_request_id: str | None) -> str:
    """The id that names a request in responses: the X-Request-Id header, else the body's
    ``request_id``, else the random id the request middleware assigned."""
    if request.headers.get("x-request-id"):
        return str(request.ctx.request_id)
    return body_request_id or str(request.ctx.request_id)


@dataclass
class ChoiceAccumulator:
    """One choice's output gathered from the engine's deltas (non-streaming responses)."""

    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


Handler = Callable[..., Awaitable[Any]]


def admitted(handler: Handler) -> Handler:
    """Route decorator: 503 while the server cannot serve (loading, draining, engine dead), 503
    ``server_overloaded`` past the limits, else the handler runs holding a ``Ticket``
    (``request.ctx.admission``) until it returns, raises or is cancelled (disconnect)."""

    @functools.wraps(handler)
    async def run(request: Request, *args: Any, **kwargs: Any) -> Any:
        state: ServerState = request.app.ctx.state
        state.require_engine()
        assert state.admission is not None and state.metrics is not None
        try:
            ticket = state.admission.admit(len(request.body or b""))
        except Overloaded as e:
            state.metrics.rejected(e.reason)
            raise
        request.ctx.admission = ticket
        state.in_flight += 1
        state.metrics.http_in_flight.inc()
        try:
            return await handler(request, *args, **kwargs)
        finally:
            ticket.release()
            state.in_flight -= 1
            state.metrics.http_in_flight.dec()

    return run
