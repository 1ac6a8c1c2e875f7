"""``ServerArgs``: the HTTP server's own options (the engine's live in ``EngineArgs``).

Filled by ``serving.cli`` from the command line and ``--config`` YAML; each field is declared
with ``serving.options.option``, from which the ``serve`` option, its YAML key and its ``--help``
entry are generated. Defaults are tuned for LLM traffic (see docs/SERVER.md, "Timeouts and
limits"):

- ``response_timeout`` 3600 s: Sanic's 60 s default would cut a long non-streaming generation (it
  counts from the last byte sent; a streaming response resets it with every chunk);
- ``keep_alive_timeout`` 75 s: longer than the 60 s idle timeout of common load balancers, so the
  server never closes a connection the proxy is about to reuse (vLLM's 5 s causes 502s there);
- ``max_request_body`` 4 MiB → 413 above it (Sanic's default is 100 MB);
- ``backlog`` 2048 (uvicorn's): a burst is queued by the kernel until admission control answers
  it, instead of overflowing Sanic's 100;
- ``shutdown_timeout`` 30 s: how long SIGTERM waits for in-flight requests before aborting them;
- ``max_queued_requests`` 4 x ``--max-num-seqs`` beyond the running ones, then 503
  ``server_overloaded`` (``serving.api.admission``).
"""

from __future__ import annotations

from dataclasses import dataclass

from serving.api.chat_template import load_chat_template
from serving.api.reasoning import reasoning_parser_names
from serving.api.template_worker import DEFAULT_MEMORY_BYTES
from serving.api.tool_parsers import load_tool_parser_plugin, tool_parser_names
from serving.engine.sampling_params import MAX_LOGPROBS
from serving.options import byte_size, int_in_range, option

CHAT = "Chat templates"
TOOLS = "Tool calling"
REASONING = "Reasoning"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def _loadable_template(value: str) -> str:
    """A ``--chat-template`` that cannot be read stops ``serve`` before the model loads."""
    load_chat_template(value)  # ValueError names the path
    return value


def _tool_parser_plugin(value: str) -> str:
    """``--tool-parser-plugin``: loaded now, so that its parsers are registered before
    ``--tool-call-parser`` is checked against them."""
    load_tool_parser_plugin(value)  # ValueError names the file
    return value


@dataclass
class ServerArgs:
    host: str = option(
        "127.0.0.1", "Address to bind. The default is loopback only; pass 0.0.0.0 to expose the "
                     "server.")
    port: int = option(8000, "Port to bind.")
    backlog: int = option(
        2048, "Listen backlog: connections the kernel queues before the server accepts them "
              "(capped by net.core.somaxconn). Sanic's 100 dropped a quarter of a 1,600-request "
              "burst before admission control could answer it with 503.",
        parse=int_in_range(1, 65535), metavar="N")
    api_keys: list[str] = option(
        [], "Require `Authorization: Bearer KEY` on every route except /health, /metrics and "
            "/version (several keys allowed). Falls back to the XLASERVE_API_KEY environment "
            "variable.", name="api-key", metavar="KEY")
    served_model_names: list[str] = option(
        [], "Model names clients may use in `model`; the first is used in responses. Default: "
            "the model's own name.", name="served-model-name", metavar="NAME")
    chat_template: str | None = option(
        None, "Jinja chat template: a file path or the template itself. Default: the template in "
              "the tokenizer config or GGUF metadata. Examples: configs/chat_templates/.",
        parse=_loadable_template, metavar="PATH_OR_TEMPLATE", group=CHAT)
    chat_template_content_format: str = option(
        "auto", "How message content reaches the template: 'string' (text) or 'openai' (a list "
                "of parts). 'auto' detects it from the template.",
        choices=("auto", "string", "openai"), group=CHAT)
    trust_request_chat_template: bool = option(
        False, "Allow requests to bring their own chat_template (refused by default: templates "
               "are code).", group=CHAT)
    chat_template_render_timeout: float = option(
        5.0, "Time limit for rendering one chat template; a worker still rendering 1 s after it "
             "is killed.", metavar="SECONDS", group=CHAT)
    chat_template_render_memory: int = option(
        DEFAULT_MEMORY_BYTES, "Address-space limit of each chat template worker process (bytes, "
                              "or 512MiB, 1G); a template that needs more gets 400.",
        parse=byte_size, metavar="SIZE", group=CHAT)
    chat_template_workers: int = option(
        2, "Chat template worker processes (templates render outside the server process, so a "
           "hostile one can be killed).", parse=int_in_range(1, 64), group=CHAT)
    response_role: str = option(
        "assistant", "Role of generated chat messages when add_generation_prompt is true.",
        group=CHAT)
    enable_request_id_headers: bool = option(
        False, "Echo the client's X-Request-Id response header, or send a generated one.")
    allowed_origins: list[str] = option(
        [], "CORS origins allowed to call the API ('*' for any; a JSON list works too). Default: "
            "none, no CORS headers are sent.", metavar="ORIGIN")
    allowed_methods: list[str] = option(
        ["GET", "POST", "OPTIONS"], "CORS methods allowed in preflight answers.",
        metavar="METHOD")
    allowed_headers: list[str] = option(
        ["*"], "CORS request headers allowed ('*': any).", metavar="HEADER")
    allow_credentials: bool = option(
        False, "CORS: allow credentials (the origin is then echoed, never '*').")
    log_level: str = option(
        "info", "Log level of the server (`--uvicorn-log-level` is accepted as an alias for vLLM "
                "compatibility).", choices=LOG_LEVELS, aliases=("--uvicorn-log-level",))
    disable_log_requests: bool = option(
        False, "Do not log one line per request (method, path, status, latency, request id; "
               "bodies are never logged).")
    max_request_body: int = option(
        4 * 1024 * 1024, "Largest request body accepted (bytes, or 4MiB, 512k); larger bodies "
                         "get 413.", parse=byte_size, metavar="SIZE")
    max_n: int = option(
        16, "Largest number of choices per request (n × number of prompts).",
        parse=int_in_range(1))
    max_logprobs: int = option(
        MAX_LOGPROBS, f"Most logprobs a request may ask for (at most {MAX_LOGPROBS}).",
        parse=int_in_range(0, MAX_LOGPROBS))
    request_timeout: float = option(
        60.0, "Time a client has to send its whole request (408 after).", metavar="SECONDS")
    response_timeout: float = option(
        3600.0, "Longest silence while answering: the whole of a non-streaming generation, or "
                "the gap between two streamed chunks (503 after).", metavar="SECONDS")
    keep_alive_timeout: float = option(
        75.0, "Idle time before a keep-alive connection is closed (keep it above your load "
              "balancer's idle timeout).", metavar="SECONDS")
    shutdown_timeout: float = option(
        30.0, "On SIGTERM, how long in-flight requests may finish before they are aborted.",
        metavar="SECONDS")
    max_queued_requests: int | None = option(
        None, "Requests admitted beyond the --max-num-seqs the engine runs at once; past it a "
              "request gets 503 server_overloaded with Retry-After, before any work is done "
              "for it. Default: 4 x --max-num-seqs.", parse=int_in_range(0))
    max_queued_prompt_tokens: int | None = option(
        None, "Prompt tokens all admitted requests may hold together (estimated from the body "
              "size until tokenized); past it: 503 server_overloaded. Default: no limit.",
        parse=int_in_range(1), metavar="TOKENS")
    return_tokens_as_token_ids: bool = option(
        False, "Show logprob tokens as `token_id:N` in every response.")
    enable_force_include_usage: bool = option(
        False, "Send the usage chunk at the end of every stream, even without "
               "stream_options.include_usage.")
    enable_auto_tool_choice: bool = option(
        False, "Let the model decide when to call tools (tool_choice \"auto\", the default when "
               "a request has tools); needs --tool-call-parser.", group=TOOLS)
    tool_call_parser: str | None = option(
        None, "How tool calls are read from the model's output with tool_choice \"auto\": "
              "hermes, llama3_json, mistral, pythonic, qwen3_xml, or a name a "
              "--tool-parser-plugin registers.", metavar="NAME", group=TOOLS)
    tool_parser_plugin: str | None = option(
        None, "A Python file whose tool parsers register themselves "
              "(@register_tool_parser(NAME) from serving.api.tool_parsers).",
        parse=_tool_parser_plugin, metavar="PATH", group=TOOLS)
    exclude_tools_when_tool_choice_none: bool = option(
        False, "Do not show the tools to the chat template when tool_choice is \"none\".",
        group=TOOLS)
    reasoning_parser: str | None = option(
        None, "Split a thinking model's output into reasoning_content and content: "
              "deepseek_r1 (output starts in reasoning, ends at </think>) or qwen3 (reasoning "
              "only after a leading <think>). A request's grammar then applies only after the "
              "reasoning ends.", metavar="NAME", group=REASONING)

    def __post_init__(self) -> None:
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
        if self.tool_call_parser is not None and \
                self.tool_call_parser not in tool_parser_names():
            raise ValueError(f"--tool-call-parser {self.tool_call_parser}: unknown parser; "
                             f"valid names: {', '.join(tool_parser_names())}")
        if self.reasoning_parser is not None and \
                self.reasoning_parser not in reasoning_parser_names():
            raise ValueError(f"--reasoning-parser {self.reasoning_parser}: unknown parser; "
                             f"valid names: {', '.join(reasoning_parser_names())}")
