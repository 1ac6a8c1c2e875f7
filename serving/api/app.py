"""The Sanic application: factory, middleware, listeners.

``create_app(args, engine_factory)`` returns an app whose engine lives in exactly one process:
``serving.cli`` runs it with ``single_process=True`` (Sanic's multi-worker mode would fork one
engine per worker, each claiming the accelerator).

Lifecycle (docs/RELIABILITY.md, "Lifecycle" and "Faults"):
- after the socket is bound, a background task calls ``engine_factory()`` in a daemon thread
  (loading and compiling take seconds to minutes), then ``engine.start()`` on the server loop,
  then starts the chat template workers and builds the metrics and admission control.
  Meanwhile ``/health`` (liveness) answers 200 and ``/ready`` and every ``/v1`` route 503, so
  orchestrators can tell "loading" from "dead". A load failure stops the server with exit code 1;
- if the engine dies later (a step raised, or the ``--engine-step-timeout`` watchdog saw a step
  hang), in-flight requests end with an error (500, or an error event then ``[DONE]`` in a
  stream), ``/health`` and ``/ready`` turn 503 at once, and the server exits with code 1 so a
  supervisor restarts it (vLLM's policy; the engine is never rebuilt in place);
- on SIGTERM/SIGINT (``before_server_stop``) ``/ready`` turns 503 and new requests get 503; the
  server waits up to ``shutdown_timeout`` for in-flight requests, then shuts the engine down
  (what is left ends with finish_reason "abort") and exits with code 0.

Middleware: request ids (``X-Request-Id`` echoed or generated with
``--enable-request-id-headers``), API-key auth (deny by default: every route except ``/health``,
``/ready``, ``/metrics`` and ``/version``; OPTIONS preflights are exempt), CORS (off unless
``--allowed-origins``), and one access-log line per request (never bodies or keys).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from sanic import HTTPResponse, Request, Sanic
from sanic.response import BaseHTTPResponse

from serving.api.admission import Admission, AdmissionLimits
from serving.api.args import ServerArgs
from serving.api.chat_template import ChatTemplateError, load_chat_template
from serving.api.engine_protocol import ServingEngine
from serving.api.errors import OpenAIErrorHandler, error_response
from serving.api.metrics import ServerMetrics
from serving.api.routes import chat, completions, info, pooling, tokenize
from serving.api.state import ServerState
from serving.api.template_worker import TemplateWorkers
from serving.api.tokens import TokenTexts

logger = logging.getLogger("xlaserve.api")
access_logger = logging.getLogger("xlaserve.access")

PUBLIC_PATHS = frozenset({"health", "ready", "metrics", "version"})
ENGINE_WATCH_INTERVAL_S = 0.5
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def create_app(args: ServerArgs, engine_factory: Callable[[], ServingEngine], *,
               model_root: str = "", name: str = "xlaserve") -> Sanic:
    """Build the app. ``engine_factory`` is called once, off the event loop, after startup."""
    # Resolve --chat-template now: a bad path should stop the server before the model loads.
    server_template = load_chat_template(args.chat_template)

    app: Sanic = Sanic(name, configure_logging=False, error_handler=OpenAIErrorHandler())
    cfg = app.config
    cfg.REQUEST_MAX_SIZE = args.max_request_body
    cfg.REQUEST_TIMEOUT = args.request_timeout
    cfg.RESPONSE_TIMEOUT = args.response_timeout
    cfg.KEEP_ALIVE_TIMEOUT = args.keep_alive_timeout
    # Connections get this long to close *after* our own drain (before_server_stop) is done.
    cfg.GRACEFUL_SHUTDOWN_TIMEOUT = 5.0
    cfg.FALLBACK_ERROR_FORMAT = "json"
    cfg.NOISY_EXCEPTIONS = False
    cfg.AUTO_EXTEND = False
    cfg.MOTD = False
    cfg.ACCESS_LOG = False

    state = ServerState(args=args, model_root=model_root)
    app.ctx.state = state
    for bp in (completions.bp, chat.bp, tokenize.bp, info.bp, pooling.bp):
        app.blueprint(bp)
    _add_preflight_routes(app)
    _add_middleware(app, args)

    async def load_engine() -> None:
        t0 = time.monotonic()
        try:
            engine = await _in_daemon_thread(engine_factory)
            await engine.start()
            renderer = await _start_renderer(args, engine, server_template)
            _on_engine_ready(state, engine, renderer)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.exception("The engine failed to load")
            state.load_error = f"The engine failed to load: {e}"
            state.exit_code = 1
            app.stop()
            return
        logger.info("Engine ready in %.1f s; serving model %s", time.monotonic() - t0,
                    ", ".join(state.served_names))
        await watch_engine(engine)

    async def watch_engine(engine: ServingEngine) -> None:
        """An engine that died takes the server down with exit code 1 (as vLLM does), so a
        supervisor restarts it; in-flight requests have already ended with an error."""
        while engine.is_healthy():
            await asyncio.sleep(ENGINE_WATCH_INTERVAL_S)
        logger.error("The engine stopped; shutting the server down (exit code 1)")
        state.exit_code = 1
        end = time.monotonic() + 5.0
        while state.in_flight and time.monotonic() < end:
            await asyncio.sleep(0.05)
        app.stop()

    @app.after_server_start
    async def _start(app: Sanic) -> None:
        logger.info("Available routes are:")
        by_path: dict[str, set[str]] = {}
        for route in app.router.routes:
            by_path.setdefault("/" + route.path, set()).update(route.methods)
        for path, methods in sorted(by_path.items()):
            logger.info("Route: %s, Methods: %s", path, ", ".join(sorted(methods)))
        app.add_task(load_engine(), name="load_engine")

    @app.before_server_stop
    async def _drain(app: Sanic) -> None:
        state.draining = True
        deadline = time.monotonic() + args.shutdown_timeout
        if state.in_flight:
            logger.info("Shutting down: waiting up to %g s for %d in-flight requests",
                        args.shutdown_timeout, state.in_flight)
        while state.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if state.engine is not None:
            if state.in_flight:
                logger.warning("Aborting %d requests still running after %g s",
                               state.in_flight, args.shutdown_timeout)
            await state.engine.shutdown(drain_timeout=max(0.0, deadline - time.monotonic()))
            # Aborted requests finish their responses (finish_reason "abort") before the
            # connections are closed.
            end = time.monotonic() + 2.0
            while state.in_flight and time.monotonic() < end:
                await asyncio.sleep(0.05)

    @app.after_server_stop
    async def _close(app: Sanic) -> None:
        if state.renderer is not None:
            await state.renderer.close()
        state.cpu_pool.shutdown(wait=False, cancel_futures=True)

    return app


async def _in_daemon_thread(fn: Callable[[], ServingEngine]) -> ServingEngine:
    """Run ``fn`` in a daemon thread: a SIGTERM during model loading must not wait for it."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[ServingEngine] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    def run() -> None:
        try:
            result = fn()
        except BaseException as e:
            loop.call_soon_threadsafe(settle, None, e)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name="engine-load", daemon=True).start()
    return await fut


async def _start_renderer(args: ServerArgs, engine: ServingEngine,
                          server_template: str | None) -> TemplateWorkers:
    """The chat template worker pool for the server's template (``--chat-template``, else the
    tokenizer's); a template that does not compile stops the server."""
    tok = engine.tokenizer
    template = server_template
    if template is None:
        template = getattr(tok, "chat_template", None)
        if isinstance(template, dict):  # named templates: use the default one
            template = template.get("default") or next(iter(template.values()), None)
    if template is None:
        logger.warning("The model has no chat template: /v1/chat/completions will answer 400 "
                       "until the server is started with --chat-template.")
    special = {k: v for k, v in (getattr(tok, "special_tokens_map", None) or {}).items()
               if isinstance(v, str)}
    try:
        return await TemplateWorkers.start(
            template, content_format=args.chat_template_content_format, special_tokens=special,
            render_timeout=args.chat_template_render_timeout,
            memory_bytes=args.chat_template_render_memory, workers=args.chat_template_workers)
    except ChatTemplateError as e:
        raise ValueError(f"The chat template cannot be used: {e}") from None


def _on_engine_ready(state: ServerState, engine: ServingEngine,
                     renderer: TemplateWorkers) -> None:
    args = state.args
    tok = engine.tokenizer
    state.served_names = list(args.served_model_names) or [engine.model_name]
    if not state.model_root:
        state.model_root = engine.model_name
    if engine.generation_defaults:
        logger.info("Using default sampling params from model: %s", engine.generation_defaults)
    state.renderer = renderer
    state.tokens = TokenTexts(tok)
    stats_fn = engine.stats
    state.metrics = ServerMetrics(state.served_names[0], lambda: stats_fn())
    limits = AdmissionLimits.for_engine(engine.max_num_seqs, args.max_queued_requests,
                                        args.max_queued_prompt_tokens)
    logger.info("Admission: at most %d requests (%d running + %d queued)%s", limits.max_requests,
                engine.max_num_seqs, limits.max_requests - engine.max_num_seqs,
                "" if limits.max_prompt_tokens is None else
                f", {limits.max_prompt_tokens} prompt tokens")
    state.admission = Admission(limits)
    state.engine = engine


def _add_preflight_routes(app: Sanic) -> None:
    """An OPTIONS route per path, answering CORS preflights (Sanic has none by default)."""
    paths = sorted({"/" + r.path for r in app.router.routes})

    async def preflight(request: Request) -> HTTPResponse:
        return HTTPResponse(status=204)

    for i, path in enumerate(paths):
        app.add_route(preflight, path, methods=["OPTIONS"], name=f"preflight_{i}")


def _key_digests(keys: list[str]) -> list[bytes]:
    return [hashlib.sha256(k.encode()).digest() for k in keys]


def _authorized(header: str | None, digests: list[bytes]) -> bool:
    if not header:
        return False
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    given = hashlib.sha256(token.strip().encode()).digest()
    ok = False
    for d in digests:  # no early exit: the time taken does not depend on which key matched
        ok |= hmac.compare_digest(given, d)
    return ok


def _placeholder(request: Request) -> bool:
    """Sanic's stand-in for a request that failed before its head was parsed (408 while the
    head trickles in, 431, a malformed request line): method "NONE", no headers. Only error
    handling sees it (no route has that method), so its status must not become a 401."""
    return request.method == "NONE" and not request.headers


def _add_middleware(app: Sanic, args: ServerArgs) -> None:
    digests = _key_digests(args.api_keys)
    origins = set(args.allowed_origins)

    @app.middleware("request", priority=100)
    async def _request_id(request: Request) -> None:
        request.ctx.start = time.monotonic()
        given = request.headers.get("x-request-id")
        if given and _REQUEST_ID_OK.match(given):
            request.ctx.request_id = given
        else:
            request.ctx.request_id = uuid.uuid4().hex

    @app.middleware("request", priority=90)
    async def _auth(request: Request) -> HTTPResponse | None:
        if not digests or request.method == "OPTIONS" or _placeholder(request):
            return None
        route = request.route
        if route is not None and route.path.strip("/") in PUBLIC_PATHS:
            return None
        if _authorized(request.headers.get("authorization"), digests):
            return None
        return error_response(401, "Invalid or missing API key. Send `Authorization: Bearer "
                                   "<key>`.", headers={"WWW-Authenticate": "Bearer"})

    @app.middleware("response")
    async def _headers(request: Request, response: BaseHTTPResponse) -> HTTPResponse | None:
        if args.enable_request_id_headers:
            rid = getattr(request.ctx, "request_id", None) or uuid.uuid4().hex
            response.headers["X-Request-Id"] = rid
        # CORS by hand, not sanic-ext's: with allowed headers '*' its preflight answer is
        # `Access-Control-Allow-Headers: *`, which browsers do not apply to Authorization
        # (Fetch: a non-wildcard header name), so an OpenAI client in a page could not send its
        # key. Asked headers are echoed instead.
        origin = request.headers.get("origin")
        if origins and origin and ("*" in origins or origin in origins):
            wildcard = "*" in origins and not args.allow_credentials
            response.headers["Access-Control-Allow-Origin"] = "*" if wildcard else origin
            response.headers["Vary"] = "Origin"
            if args.allow_credentials:
                response.headers["Access-Control-Allow-Credentials"] = "true"
            if request.method == "OPTIONS":
                response.headers["Access-Control-Allow-Methods"] = ", ".join(args.allowed_methods)
                asked = request.headers.get("access-control-request-headers")
                allowed = ", ".join(args.allowed_headers)
                response.headers["Access-Control-Allow-Headers"] = (
                    asked if "*" in args.allowed_headers and asked else allowed)
                response.headers["Access-Control-Max-Age"] = "600"
        if not args.disable_log_requests:
            start = getattr(request.ctx, "start", None)
            took = time.monotonic() - start if start is not None else 0.0
            # The status of a stream is logged when its headers go out; never bodies or keys.
            access_logger.info("%s %s %s %d %.3fs rid=%s",
                               request.client_ip or "-", request.method,
                               request.path.encode("unicode_escape").decode()[:200],
                               response.status, took,
                               getattr(request.ctx, "request_id", "-"))
        return None
