"""``ServerArgs``: the HTTP server's own options (the engine's live in ``EngineArgs``).

Filled by ``serving.cli`` from the command line and ``--config`` YAML. Defaults are tuned for LLM
traffic (see docs/SERVER.md, "Timeouts and limits"):

- ``response_timeout`` 3600 s: Sanic's 60 s default would cut a long non-streaming generation (it
  counts from the last byte sent; a streaming response resets it with every chunk);
- ``keep_alive_timeout`` 75 s: longer than the 60 s idle timeout of common load balancers, so the
  server never closes a connection the proxy is about to reuse (vLLM's 5 s causes 502s there);
- ``max_request_body`` 4 MiB → 413 above it (Sanic's default is 100 MB);
- ``shutdown_timeout`` 30 s: how long SIGTERM waits for in-flight requests before aborting them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_REQUEST_BODY = 4 * 1024 * 1024


@dataclass
class ServerArgs:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_keys: list[str] = field(default_factory=list)
    served_model_names: list[str] = field(default_factory=list)  # empty: the engine's model name
    chat_template: str | None = None  # path or inline template; None: tokenizer / GGUF template
    chat_template_content_format: str = "auto"  # auto | string | openai
    trust_request_chat_template: bool = False
    chat_template_render_timeout: float = 5.0
    response_role: str = "assistant"
    enable_request_id_headers: bool = False
    allowed_origins: list[str] = field(default_factory=list)  # empty: no CORS headers at all
    allowed_methods: list[str] = field(default_factory=lambda: ["GET", "POST", "OPTIONS"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    log_level: str = "info"
    disable_log_requests: bool = False
    max_request_body: int = DEFAULT_MAX_REQUEST_BODY
    max_n: int = 16  # cap on n (choices per prompt) × prompts per request
    max_logprobs: int = 20
    request_timeout: float = 60.0
    response_timeout: float = 3600.0
    keep_alive_timeout: float = 75.0
    shutdown_timeout: float = 30.0
    return_tokens_as_token_ids: bool = False
    enable_force_include_usage: bool = False
