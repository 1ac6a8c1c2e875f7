"""Helpers the route modules share: JSON responses, request ids, output accumulation."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel
from sanic import HTTPResponse, Request

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
