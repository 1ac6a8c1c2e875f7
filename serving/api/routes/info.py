"""``GET /v1/models``, ``/health``, ``/ready``, ``/version`` and ``/metrics``.

- ``/health`` is liveness: 200 (empty body) while the process can still serve or is getting
  there (loading, compiling, draining); 503 once the engine has died or hung, or its load failed.
  A supervisor restarts the server on it.
- ``/ready`` is readiness: 200 only when the engine has loaded, is alive, and the server is not
  shutting down; otherwise 503 with an OpenAI-shaped error saying which. A load balancer sends
  traffic on it.

``/health``, ``/ready``, ``/version`` and ``/metrics`` need no API key.
"""

from __future__ import annotations

from importlib import metadata

from prometheus_client import CONTENT_TYPE_LATEST
from sanic import Blueprint, HTTPResponse, Request

from serving.api.errors import error_response
from serving.api.protocol import ModelCard, ModelList, ModelPermission
from serving.api.routes.common import json_response, state_of

bp = Blueprint("info")


def server_version() -> str:
    try:
        return metadata.version("xlaserve")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


@bp.get("/v1/models")
async def list_models(request: Request) -> HTTPResponse:
    state = state_of(request)
    engine = state.require_engine()
    cards = [ModelCard(id=name, root=state.model_root or name, max_model_len=engine.max_model_len,
                       permission=[ModelPermission(id=f"modelperm-{name}")])
             for name in state.served_names]
    return json_response(ModelList(data=cards))


@bp.get("/health")
async def health(request: Request) -> HTTPResponse:
    state = state_of(request)
    if state.load_error is not None:
        return error_response(503, state.load_error)
    if state.engine is not None and not state.engine.is_healthy():
        return error_response(503, "The engine has stopped.")
    return HTTPResponse(status=200)


@bp.get("/ready")
async def ready(request: Request) -> HTTPResponse:
    state = state_of(request)
    if state.draining:
        return error_response(503, "The server is shutting down.")
    if state.engine is None or not state.ready:
        return error_response(503, state.load_error or "The model is still loading.")
    if not state.engine.is_healthy():
        return error_response(503, "The engine has stopped.")
    return HTTPResponse(status=200)


@bp.get("/version")
async def version(request: Request) -> HTTPResponse:
    from sanic.response import json as json_body

    return json_body({"version": server_version()})


@bp.get("/metrics")
async def metrics(request: Request) -> HTTPResponse:
    state = state_of(request)
    if state.metrics is None:
        return HTTPResponse(b"", content_type=CONTENT_TYPE_LATEST)
    return HTTPResponse(state.metrics.render(), content_type=CONTENT_TYPE_LATEST)
