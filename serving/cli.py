"""``serve [MODEL] [options]``: start the OpenAI-compatible server.

Option names follow vLLM's ``vllm serve`` where the meaning is the same (``--max-model-len``,
``--served-model-name``, ``--chat-template``...); ``_`` and ``-`` are interchangeable in option
names. ``--config FILE.yaml`` takes the same long option names as keys (without dashes, ``-`` or
``_``); precedence is command line > config file > defaults, and an unknown key is an error that
names it. ``MODEL`` defaults to the bundled SmolLM2-135M-Instruct.

The parser is generated from the fields of ``ServerArgs`` (the HTTP server's options) and
``EngineArgs`` (the engine's): each field declared with ``serving.options.option`` is one option,
with the field's name, type, default and help, so nothing here repeats them. ``main`` parses into
those two dataclasses, then runs ``serving.api.app`` in a single process.

Why not a library: jsonargparse, simple-parsing and tyro (tried in turn) each miss part of the
vLLM-compatible surface that tests/test_cli.py pins: both spellings of a name, ``--x a b`` lists,
``--no-x`` flags, YAML keys with dashes, command line > YAML whatever the order, argparse's error
messages, one option filling a field of each dataclass (see the commit that added this module's
generator for the details).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import MISSING, Field, dataclass, fields
from typing import Any, Union, get_args, get_origin, get_type_hints

from serving.api.args import ServerArgs
from serving.engine.config import EngineArgs
from serving.options import OPTION_KEY, Option

logger = logging.getLogger("xlaserve")

# The dataclasses whose fields are the options, each with its --help section. A field name in
# both is one option filling both; only the first declares it with option().
SECTIONS: tuple[tuple[type[Any], str], ...] = ((ServerArgs, "HTTP server"), (EngineArgs, "Engine"))


@dataclass(frozen=True)
class _Declared:
    """One option: the field that declares it, its annotation and its section."""

    field: Field[Any]
    spec: Option
    hint: Any
    section: str

    @property
    def default(self) -> Any:
        if self.field.default_factory is not MISSING:
            return self.field.default_factory()
        return self.field.default


def declared_options(sections: Sequence[tuple[type[Any], str]] = SECTIONS) -> list[_Declared]:
    """The options ``sections`` declare, in field order. Raises ``TypeError`` for a field not
    declared with ``option()`` (unless an earlier section declares one of that name with the
    same default) and for a name declared twice."""
    out: dict[str, _Declared] = {}
    for cls, section in sections:
        hints = get_type_hints(cls)
        for f in fields(cls):
            spec: Option | None = f.metadata.get(OPTION_KEY)
            first = out.get(f.name)
            if first is None:
                if spec is None:
                    raise TypeError(f"{cls.__name__}.{f.name} is not declared with "
                                    "serving.options.option()")
                out[f.name] = _Declared(f, spec, hints[f.name], section)
                continue
            if spec is not None:
                raise TypeError(f"option {f.name!r} is declared twice (only the first "
                                f"dataclass may use option(); {cls.__name__} shares it)")
            shared = _Declared(f, first.spec, hints[f.name], section)
            if shared.default != first.default or shared.hint != first.hint:
                raise TypeError(f"{cls.__name__}.{f.name} shares option {f.name!r} but its type "
                                "or default differs")
    return list(out.values())


class _FlatList(argparse.Action):
    """``--allowed-origins a b`` or ``--allowed-origins '["a","b"]'`` → one flat list (each
    value was already split by ``_str_list``, argparse's ``type`` for list options)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, [item for value in values for item in value])


def _str_list(value: str) -> list[str]:
    """One value of a list option: a JSON list (``'["a", "b"]'``, vLLM's form) or one item."""
    text = value.strip()
    if not text.startswith("["):
        return [value]
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"invalid JSON list {value!r}: {e}") from None
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {value!r}")
    return list(items)


def _user_parser(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``Option.parse`` for argparse: its ``ValueError`` message reaches the user as is."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def _unwrap_optional(hint: Any) -> Any:
    """``int | None`` → ``int``; other annotations unchanged."""
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _add_option(target: Any, opt: _Declared) -> None:
    """Add the argparse argument(s) for one declared field to ``target`` (parser or group)."""
    spec, name = opt.spec, opt.field.name
    flags = [f"--{spec.name or name.replace('_', '-')}", *spec.aliases]
    kw: dict[str, Any] = {"dest": name, "default": opt.default, "help": spec.help}
    if spec.metavar:
        kw["metavar"] = spec.metavar
    if spec.choices:
        kw["choices"] = spec.choices
    base = _unwrap_optional(opt.hint)
    if (base is bool or get_origin(base) is list) and (spec.parse or spec.choices):
        raise TypeError(f"option {name!r}: Option.parse and choices are for one-value options")
    if base is bool:
        if opt.hint is not bool:
            raise TypeError(f"option {name!r}: a flag cannot be None")
        kw["action"] = argparse.BooleanOptionalAction if opt.default else "store_true"
    elif get_origin(base) is list and get_args(base) == (str,):
        kw.update(nargs="+", action=_FlatList, type=_str_list)
    elif spec.parse is not None:
        kw["type"] = _user_parser(spec.parse)
    elif base in (int, float, str):
        kw["type"] = base
    else:
        raise TypeError(f"option {name!r}: annotation {opt.hint!r} needs Option.parse")
    if spec.positional:
        # `serve MODEL` or `serve --model MODEL`; parse_args checks that they agree.
        metavar = spec.metavar or name.upper()
        target.add_argument(name, nargs="?", default=opt.default, metavar=metavar,
                            help=spec.help, **{k: v for k, v in kw.items()
                                               if k in ("type", "choices")})
        kw.update(dest=_option_dest(name), default=None, metavar=metavar,
                  help=f"The {name}, as an option instead of the positional {metavar}.")
    target.add_argument(*flags, **kw)


def _option_dest(name: str) -> str:
    """Where ``--NAME`` of a positional option lands (the positional itself uses ``NAME``)."""
    return f"{name}_option"


def build_parser(sections: Sequence[tuple[type[Any], str]] = SECTIONS) -> argparse.ArgumentParser:
    """The ``serve`` parser, generated from the fields of ``sections`` (``serving.options``)."""
    p = argparse.ArgumentParser(
        prog="serve",
        description="Serve a model behind an OpenAI-compatible HTTP API (completions, chat, "
                    "tokenize, models, health, metrics). Option names follow `vllm serve`; "
                    "`_` and `-` are interchangeable.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", metavar="FILE.yaml", default=None,
                   help="YAML file whose keys are long option names (e.g. max-model-len: 4096). "
                        "Precedence: command line > config file > defaults. Unknown keys are "
                        "an error.")
    groups: dict[str, Any] = {}
    for opt in declared_options(sections):
        if opt.spec.positional:
            _add_option(p, opt)
            continue
        title = opt.spec.group or opt.section
        if title not in groups:
            groups[title] = p.add_argument_group(title)
        _add_option(groups[title], opt)
    return p


def _normalize_option(token: str) -> str:
    """``--max_model_len=4k`` → ``--max-model-len=4k`` (vLLM accepts both spellings)."""
    if not token.startswith("--"):
        return token
    name, eq, value = token.partition("=")
    return name.replace("_", "-") + eq + value


def _long_options(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.Action]]:
    """(long option name without dashes, its action), ``--no-x`` forms and --help excepted."""
    for action in parser._actions:
        if action.dest == "help":
            continue
        negatable = isinstance(action, argparse.BooleanOptionalAction)
        for opt in action.option_strings:
            if opt.startswith("--") and not (negatable and opt.startswith("--no-")):
                yield opt[2:], action


def config_to_argv(path: str, parser: argparse.ArgumentParser,
                   ) -> tuple[list[str], dict[str, str | None], set[str]]:
    """YAML config → argv tokens for the options it sets.

    Returns the tokens, the config's values for positional options (``model``; used only if the
    command line names none), and the destinations the config sets (they become the parser's
    defaults, so the command line still wins).
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
        return [], {}, set()
    if not isinstance(data, dict):
        parser.error(f"--config {path}: expected a mapping of option names to values")
    actions = dict(_long_options(parser))
    positional = {_option_dest(a.dest) for a in parser._actions if not a.option_strings}
    argv: list[str] = []
    dests: set[str] = set()
    positional_values: dict[str, str | None] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("_", "-")
        if key == "config":
            parser.error(f"--config {path}: a config file cannot name another config file")
        action = actions.get(key)
        if action is None:
            parser.error(f"--config {path}: unknown option {raw_key!r} (keys are long option "
                         f"names, see `serve --help`)")
        if action.dest in positional:
            positional_values[action.dest] = None if value is None else str(value)
            continue
        opt = f"--{key}"
        dests.add(action.dest)
        if action.nargs == 0:  # a flag: store_true, or --x / --no-x
            if not isinstance(value, bool):
                parser.error(f"--config {path}: {raw_key} must be true or false")
            if isinstance(action, argparse.BooleanOptionalAction):
                argv.append(opt if value else f"--no-{key}")
            elif value:
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
    return argv, positional_values, dests


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_args(argv: Sequence[str] | None = None) -> tuple[EngineArgs, ServerArgs]:
    """The command line (and its ``--config``) → the engine's and the server's options."""
    parser = build_parser()
    tokens = [_normalize_option(t) for t in (sys.argv[1:] if argv is None else argv)]
    ns = parser.parse_args(tokens)
    config_positionals: dict[str, str | None] = {}
    if ns.config:
        cfg_argv, config_positionals, dests = config_to_argv(ns.config, parser)
        # Parsing the config's tokens alone checks types and choices with the usual messages;
        # its values then become defaults, which the command line overrides.
        cfg_ns = parser.parse_args(cfg_argv)
        parser.set_defaults(**{d: getattr(cfg_ns, d) for d in dests})
        ns = parser.parse_args(tokens)
    values = vars(ns)
    for opt in declared_options():
        if not opt.spec.positional:
            continue
        name, dest = opt.field.name, _option_dest(opt.field.name)
        given, as_option = values.pop(name), values.pop(dest)
        if given is not None and as_option is not None and given != as_option:
            parser.error(f"two different {name}s: {given!r} and --{name} {as_option!r}")
        if given is None:
            given = as_option if as_option is not None else config_positionals.get(dest)
        values[name] = given
    if not values["api_keys"] and os.environ.get("XLASERVE_API_KEY"):
        values["api_keys"] = [os.environ["XLASERVE_API_KEY"]]
    engine = EngineArgs(**{f.name: values[f.name] for f in fields(EngineArgs)})
    try:  # options that only make sense together (--enable-auto-tool-choice and a parser)
        server = ServerArgs(**{f.name: values[f.name] for f in fields(ServerArgs)})
    except ValueError as e:
        parser.error(str(e))
    return engine, server


# Characters that end, rewrite or hide a line on a terminal or in a log viewer (all C0/C1
# controls but tab and newline, and Unicode's line and paragraph separators).
_UNSAFE_IN_LOGS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def _escape_unsafe(text: str) -> str:
    return _UNSAFE_IN_LOGS.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


class EscapingFormatter(logging.Formatter):
    """Log records that client bytes cannot forge (a URL, a header, a field name may reach a
    message or an exception): a message is one line, its control characters and newlines escaped;
    a traceback keeps its newlines but has its control characters escaped and every line
    indented, so no line of it can pass for a record of its own."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _escape_unsafe(record.message).replace("\n", "\\n")
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return self._indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return self._indented(super().formatStack(stack_info))

    @staticmethod
    def _indented(text: str) -> str:
        return "\n".join("  " + _escape_unsafe(line) for line in text.split("\n"))


def setup_logging(level: str) -> None:
    numeric = logging.DEBUG if level == "trace" else getattr(logging, level.upper())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EscapingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=numeric, handlers=[handler], force=True)
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
    from serving.api.http_protocol import DeadlineHttpProtocol

    app = create_app(server_args, engine_factory, model_root=model_root)
    logger.info("Starting xlaserve on http://%s:%d", server_args.host, server_args.port)
    app.run(host=server_args.host, port=server_args.port, single_process=True,
            backlog=server_args.backlog, access_log=False, motd=False,
            protocol=DeadlineHttpProtocol)
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
