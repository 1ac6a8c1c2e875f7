"""``serve [MODEL] [options]``: start the OpenAI-compatible server.

Option names follow vLLM's ``vllm serve`` where the meaning is the same (``--max-model-len``,
``--served-model-name``, ``--chat-template``...); ``_`` and ``-`` are interchangeable in option
names. ``--config FILE.yaml`` takes the same long option names as keys (without dashes, ``-`` or
``_``); precedence is command line > config file > defaults, and an unknown key is an error that
names it. ``MODEL`` defaults to the bundled SmolLM2-135M-Instruct.

``main`` parses into ``EngineArgs`` (the engine's options) and ``ServerArgs`` (the HTTP server's),
then runs ``serving.api.app`` in a single process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from serving.api.args import DEFAULT_HOST, DEFAULT_MAX_REQUEST_BODY, DEFAULT_PORT, ServerArgs
from serving.engine.config import EngineArgs

logger = logging.getLogger("xlaserve")

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
TASKS = ("auto", "generate", "embed", "embedding", "classify", "score")
ENGINE_FIELDS = {f.name for f in fields(EngineArgs)}
SERVER_FIELDS = {f.name for f in fields(ServerArgs)}
# CLI dest → ServerArgs field, where the vLLM option name differs from our field name.
SERVER_RENAMES = {"api_key": "api_keys", "served_model_name": "served_model_names"}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)(i?[bB]?)\s*$")


def _int_with_suffix(value: str) -> int:
    """``2048``, ``2k``, ``32K``, ``25.6k`` (vLLM's --max-model-len forms; k = 1000, K = 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", value)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid length {value!r} (examples: 2048, 4k, 32K)")
    number, suffix = float(m.group(1)), m.group(2)
    scale = {"": 1, "k": 1000, "K": 1024, "m": 1000**2, "M": 1024**2}[suffix]
    result = number * scale
    if result != int(result):
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of tokens")
    return int(result)


def _bytes(value: str) -> int:
    """``4194304``, ``4MiB``, ``4M``, ``512k``: a size in bytes (binary units)."""
    m = _SIZE.match(value)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {value!r} (examples: 4MiB, 512k, 1048576)")
    number, unit = float(m.group(1)), m.group(2).lower()
    return int(number * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit])


def _str_list(value: str) -> list[str]:
    """A JSON list (``'["a", "b"]'``, vLLM's form) or a single value."""
    text = value.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"invalid JSON list {value!r}: {e}") from None
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {value!r}")
        return items
    return [value]


class _ExtendList(argparse.Action):
    """``--allowed-origins a b`` or ``--allowed-origins '["a","b"]'`` → a flat list."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        flat: list[str] = []
        for v in values:
            flat.extend(_str_list(v))
        setattr(namespace, self.dest, flat)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="serve",
        description="Serve a model behind an OpenAI-compatible HTTP API (completions, chat, "
                    "tokenize, models, health, metrics). Option names follow `vllm serve`; "
                    "`_` and `-` are interchangeable.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", nargs="?", default=None,
                   help="Model: a GGUF file, a Hugging Face-style directory, or an asset alias "
                        "such as smollm2-135m-instruct. Default: the bundled "
                        "SmolLM2-135M-Instruct.")
    p.add_argument("--model", dest="model_option", default=None, metavar="MODEL",
                   help="The model, as an option instead of the positional argument.")
    p.add_argument("--config", metavar="FILE.yaml", default=None,
                   help="YAML file whose keys are long option names (e.g. max-model-len: 4096). "
                        "Precedence: command line > config file > defaults. Unknown keys are "
                        "an error.")

    g = p.add_argument_group("HTTP server")
    g.add_argument("--host", default=DEFAULT_HOST,
                   help="Address to bind. The default is loopback only; pass 0.0.0.0 to expose "
                        "the server.")
    g.add_argument("--port", type=int, default=DEFAULT_PORT, help="Port to bind.")
    g.add_argument("--api-key", nargs="+", default=None, metavar="KEY",
                   help="Require `Authorization: Bearer KEY` on every route except /health, "
                        "/metrics and /version (several keys allowed). Falls back to the "
                        "XLASERVE_API_KEY environment variable.")
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="Model names clients may use in `model`; the first is used in "
                        "responses. Default: the model's own name.")
    g.add_argument("--enable-request-id-headers", action="store_true",
                   help="Echo the client's X-Request-Id response header, or send a generated "
                        "one.")
    g.add_argument("--allowed-origins", nargs="+", action=_ExtendList, default=[],
                   metavar="ORIGIN",
                   help="CORS origins allowed to call the API ('*' for any; a JSON list works "
                        "too). Default: none, no CORS headers are sent.")
    g.add_argument("--allowed-methods", nargs="+", action=_ExtendList,
                   default=["GET", "POST", "OPTIONS"], metavar="METHOD",
                   help="CORS methods allowed in preflight answers.")
    g.add_argument("--allowed-headers", nargs="+", action=_ExtendList, default=["*"],
                   metavar="HEADER", help="CORS request headers allowed ('*': any).")
    g.add_argument("--allow-credentials", action="store_true",
                   help="CORS: allow credentials (the origin is then echoed, never '*').")
    g.add_argument("--log-level", "--uvicorn-log-level", dest="log_level", default="info",
                   choices=LOG_LEVELS,
                   help="Log level of the server (`--uvicorn-log-level` is accepted as an alias "
                        "for vLLM compatibility).")
    g.add_argument("--disable-log-requests", action="store_true",
                   help="Do not log one line per request (method, path, status, latency, "
                        "request id; bodies are never logged).")
    g.add_argument("--max-request-body", type=_bytes, default=DEFAULT_MAX_REQUEST_BODY,
                   metavar="SIZE", help="Largest request body accepted (bytes, or 4MiB, 512k); "
                                        "larger bodies get 413.")
    g.add_argument("--max-n", type=int, default=16,
                   help="Largest number of choices per request (n × number of prompts).")
    g.add_argument("--request-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="Time a client has to send its whole request (408 after).")
    g.add_argument("--response-timeout", type=float, default=3600.0, metavar="SECONDS",
                   help="Longest silence while answering: the whole of a non-streaming "
                        "generation, or the gap between two streamed chunks (503 after).")
    g.add_argument("--keep-alive-timeout", type=float, default=75.0, metavar="SECONDS",
                   help="Idle time before a keep-alive connection is closed (keep it above your "
                        "load balancer's idle timeout).")
    g.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="On SIGTERM, how long in-flight requests may finish before they are "
                        "aborted.")
    g.add_argument("--return-tokens-as-token-ids", action="store_true",
                   help="Show logprob tokens as `token_id:N` in every response.")
    g.add_argument("--enable-force-include-usage", action="store_true",
                   help="Send the usage chunk at the end of every stream, even without "
                        "stream_options.include_usage.")

    t = p.add_argument_group("Chat templates")
    t.add_argument("--chat-template", default=None, metavar="PATH_OR_TEMPLATE",
                   help="Jinja chat template: a file path or the template itself. Default: the "
                        "template in the tokenizer config or GGUF metadata. Examples: "
                        "configs/chat_templates/.")
    t.add_argument("--chat-template-content-format", default="auto",
                   choices=("auto", "string", "openai"),
                   help="How message content reaches the template: 'string' (text) or 'openai' "
                        "(a list of parts). 'auto' detects it from the template.")
    t.add_argument("--trust-request-chat-template", action="store_true",
                   help="Allow requests to bring their own chat_template (refused by default: "
                        "templates are code).")
    t.add_argument("--chat-template-render-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="Time limit for rendering one chat template.")
    t.add_argument("--response-role", default="assistant",
                   help="Role of generated chat messages when add_generation_prompt is true.")

    e = p.add_argument_group("Engine")
    e.add_argument("--tokenizer", default=None,
                   help="A separate tokenizer (Hugging Face directory). Default: the model's.")
    e.add_argument("--dtype", default="auto",
                   choices=("auto", "float32", "float", "bfloat16", "float16", "half"),
                   help="Weight and activation dtype ('auto': float32 on CPU, bfloat16 on "
                        "accelerators).")
    e.add_argument("--max-model-len", type=_int_with_suffix, default=None, metavar="TOKENS",
                   help="Context length (prompt + output), e.g. 2048 or 4k. Default: the model's.")
    e.add_argument("--max-num-seqs", type=int, default=32,
                   help="Most sequences in one batch.")
    e.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="Most tokens in one engine step. Default: chosen from --max-num-seqs.")
    e.add_argument("--block-size", type=int, default=16, help="Tokens per KV-cache page.")
    e.add_argument("--num-kv-pages", type=int, default=None,
                   help="KV-cache pages in the pool. Default: sized from --kv-cache-gb or "
                        "--kv-cache-memory-fraction.")
    e.add_argument("--kv-cache-gb", type=float, default=None,
                   help="KV-cache pool size in GiB.")
    e.add_argument("--kv-cache-memory-fraction", "--gpu-memory-utilization", type=float,
                   default=0.9, dest="kv_cache_memory_fraction",
                   help="Fraction of accelerator memory left after the weights that the KV "
                        "cache may use.")
    e.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=True, help="Reuse KV pages of identical prompt prefixes.")
    e.add_argument("--generation-config", default="auto",
                   help="Sampling defaults: 'auto' (the model's generation_config), 'vllm' "
                        "(none: neutral defaults), or a folder holding generation_config.json.")
    e.add_argument("--seed", type=int, default=0, help="Seed of the engine's sampling RNG.")
    e.add_argument("--max-logprobs", type=int, default=20,
                   help="Most logprobs a request may ask for (at most 20).")
    e.add_argument("--cache-dir", default=None,
                   help="Model-asset and compilation cache (default ~/.cache/xlaserve or "
                        "$XLASERVE_CACHE_DIR).")
    e.add_argument("--compilation-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="Use JAX's persistent compilation cache under --cache-dir.")
    e.add_argument("--attention-backend", default="auto",
                   choices=("auto", "reference", "pallas", "pallas-interpret"),
                   help="Paged-attention implementation.")

    pl = p.add_argument_group("Pooling models (embeddings, scores)")
    pl.add_argument("--task", default="auto", choices=TASKS,
                    help="What to serve. 'auto': text generation for decoder models; "
                         "/v1/embeddings, /pooling, /score and /rerank for BERT-family "
                         "encoders (sentence-transformers models), /score, /rerank and "
                         "/classify for cross-encoders (…ForSequenceClassification). "
                         "'embed'/'embedding': embeddings from an encoder, or from a decoder "
                         "(Llama/Qwen/Gemma 3 families; last-token pooling, normalised); "
                         "'classify'/'score' demand a cross-encoder.")
    pl.add_argument("--override-pooler-config", default=None, metavar="JSON",
                    help='Pooling of an embedding model, over its sentence-transformers '
                         'config: e.g. \'{"pooling_type": "CLS", "normalize": false}\' '
                         '(pooling_type MEAN, CLS = first token, or LAST; defaults: CLS for '
                         'encoders, LAST for decoders, normalize true).')

    # ---- parallelism (sharding/; docs/SHARDING.md) ----
    d = p.add_argument_group("Parallelism")
    d.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="Shard weights and the KV cache over this many devices.")
    d.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                   help="Independent engine replicas, each on its own tensor-parallel devices.")
    d.add_argument("--mesh", default=None, metavar="SPEC",
                   help="Both sizes at once: 'data=D,model=M' or 'DxM'.")
    d.add_argument("--distributed-coordinator", default=None, metavar="HOST:PORT",
                   help="Multi-host: process 0's address (else $JAX_COORDINATOR_ADDRESS).")
    d.add_argument("--num-processes", type=int, default=None,
                   help="Multi-host: number of processes (else $JAX_NUM_PROCESSES).")
    d.add_argument("--process-id", type=int, default=None,
                   help="Multi-host: this process's index; 0 serves HTTP, the others follow.")
    return p


def _normalize_option(token: str) -> str:
    """``--max_model_len=4k`` → ``--max-model-len=4k`` (vLLM accepts both spellings)."""
    if not token.startswith("--"):
        return token
    name, eq, value = token.partition("=")
    return name.replace("_", "-") + eq + value


def _option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Long option name without dashes ("max-model-len") → its action."""
    out = {}
    for action in parser._actions:
        for opt in action.option_strings:
            if opt.startswith("--"):
                out[opt[2:]] = action
                if opt.startswith("--no-"):
                    continue
    return out


def config_to_argv(path: str,
                   parser: argparse.ArgumentParser) -> tuple[list[str], str | None, set[str]]:
    """YAML config → argv tokens for the options it sets.

    Returns the tokens, the config's ``model`` (used only if the command line names none), and
    the destinations the config sets (they become the parser's defaults, so the command line
    still wins).
    """
    import yaml

    if not path.endswith((".yaml", ".yml")):
        parser.error(f"--config {path}: the config file must be a .yaml or .yml file")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        parser.error(f"--config {path}: {e.strerror}")
    except yaml.YAMLError as e:
        parser.error(f"--config {path}: invalid YAML: {e}")
    if data is None:
        return [], None, set()
    if not isinstance(data, dict):
        parser.error(f"--config {path}: expected a mapping of option names to values")
    actions = _option_actions(parser)
    argv: list[str] = []
    dests: set[str] = set()
    model = None
    for raw_key, value in data.items():
        key = str(raw_key).replace("_", "-")
        if key == "model":
            model = None if value is None else str(value)
            continue
        if key == "config":
            parser.error(f"--config {path}: a config file cannot name another config file")
        action = actions.get(key)
        if action is None or key.startswith("no-") or action.dest == "help":
            parser.error(f"--config {path}: unknown option {raw_key!r} (keys are long option "
                         f"names, see `serve --help`)")
        opt = f"--{key}"
        dests.add(action.dest)
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                parser.error(f"--config {path}: {raw_key} must be true or false")
            argv.append(opt if value else f"--no-{key}")
        elif action.nargs == 0:  # store_true
            if not isinstance(value, bool):
                parser.error(f"--config {path}: {raw_key} must be true or false")
            if value:
                argv.append(opt)
        elif isinstance(value, list):
            if action.nargs not in ("+", "*"):
                parser.error(f"--config {path}: {raw_key} takes one value, got a list")
            argv.append(opt)
            argv.extend(str(v) for v in value)
        elif value is None:
            continue
        else:
            argv.extend([opt, _yaml_scalar(value)])
    return argv, model, dests


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_args(argv: Sequence[str] | None = None) -> tuple[EngineArgs, ServerArgs]:
    parser = build_parser()
    tokens = [_normalize_option(t) for t in (sys.argv[1:] if argv is None else argv)]
    ns = parser.parse_args(tokens)
    if ns.config:
        cfg_argv, cfg_model, dests = config_to_argv(ns.config, parser)
        # Parsing the config's tokens alone checks types and choices with the usual messages;
        # its values then become defaults, which the command line overrides.
        cfg_ns = parser.parse_args(cfg_argv)
        parser.set_defaults(**{d: getattr(cfg_ns, d) for d in dests})
        ns = parser.parse_args(tokens)
        if ns.model is None and ns.model_option is None:
            ns.model = cfg_model
    if ns.model_option is not None:
        if ns.model is not None and ns.model != ns.model_option:
            parser.error(f"two different models: {ns.model!r} and --model {ns.model_option!r}")
        ns.model = ns.model_option
    values = vars(ns)
    dtype = {"float": "float32", "half": "float16"}.get(values["dtype"], values["dtype"])
    values["dtype"] = dtype
    if values["api_key"] is None and os.environ.get("XLASERVE_API_KEY"):
        values["api_key"] = [os.environ["XLASERVE_API_KEY"]]
    if not 0 <= values["max_logprobs"] <= 20:
        parser.error("--max-logprobs must be in [0, 20]")
    if values["max_n"] < 1:
        parser.error("--max-n must be at least 1")
    if values["override_pooler_config"] is not None:
        from models.pooling import PoolerConfigError, parse_override

        try:
            parse_override(values["override_pooler_config"])
        except (PoolerConfigError, ValueError) as e:
            parser.error(f"--override-pooler-config: {e}")
    if values["chat_template"] is not None:
        from serving.api.chat_template import load_chat_template

        try:
            load_chat_template(values["chat_template"])
        except ValueError as e:
            parser.error(str(e))
    engine_kwargs = {k: v for k, v in values.items() if k in ENGINE_FIELDS}
    server_kwargs: dict[str, Any] = {}
    for k, v in values.items():
        name = SERVER_RENAMES.get(k, k)
        if name in SERVER_FIELDS:
            server_kwargs[name] = v if v is not None or name not in ("api_keys",
                                                                     "served_model_names") else []
    return EngineArgs(**engine_kwargs), ServerArgs(**server_kwargs)


def setup_logging(level: str) -> None:
    numeric = logging.DEBUG if level == "trace" else getattr(logging, level.upper())
    logging.basicConfig(level=numeric, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
    for noisy in ("sanic.access",):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _log_non_defaults(engine_args: EngineArgs, server_args: ServerArgs) -> None:
    changed = {}
    for obj, default in ((engine_args, EngineArgs()), (server_args, ServerArgs())):
        for f in fields(obj):
            value = getattr(obj, f.name)
            if value != getattr(default, f.name):
                if f.name == "api_keys":
                    value = "<hidden>"
                elif isinstance(value, str) and len(value) > 120:  # e.g. an inline template
                    value = value[:117] + "..."
                changed[f.name] = value
    logger.info("Non-default options: %s", changed)


def make_engine(engine_args: EngineArgs) -> Any:
    """The engine for the model, ``--task`` and the parallelism options: data-parallel
    replicas when asked for, else one engine (generation or pooling, as the model and ``--task``
    say). Runs in the server's loader thread (it loads and compiles)."""
    from serving.engine.data_parallel import DataParallelClient
    from serving.engine.engine_client import AsyncEngineClient

    if engine_args.data_parallel_size > 1 or engine_args.mesh:
        return DataParallelClient.from_args(engine_args)
    return AsyncEngineClient.from_args(engine_args)


def run_server(engine_args: EngineArgs, server_args: ServerArgs) -> int:
    """Start the server with the real engine and block until it stops; returns an exit code."""
    from serving.engine.engine import maybe_run_follower

    if maybe_run_follower(engine_args):  # multi-host: processes > 0 replay process 0's steps
        return 0
    return serve_app(server_args, lambda: make_engine(engine_args),
                     model_root=engine_args.model or "")


def serve_app(server_args: ServerArgs, engine_factory: Any, *, model_root: str = "") -> int:
    """Build the app around ``engine_factory`` and run it in this process until stopped."""
    from serving.api.app import create_app

    app = create_app(server_args, engine_factory, model_root=model_root)
    logger.info("Starting xlaserve on http://%s:%d", server_args.host, server_args.port)
    app.run(host=server_args.host, port=server_args.port, single_process=True,
            access_log=False, motd=False)
    code: int = app.ctx.state.exit_code
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["convert"]:  # `serve convert MODEL --output DIR` (a model dir named
        from serving.engine.convert import main as convert_main  # "convert" needs ./convert)

        return int(convert_main(args[1:]) or 0)
    engine_args, server_args = parse_args(args)
    setup_logging(server_args.log_level)
    _log_non_defaults(engine_args, server_args)
    return run_server(engine_args, server_args)


if __name__ == "__main__":
    sys.exit(main())
