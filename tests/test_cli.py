"""``serve`` option parsing: defaults, vLLM spellings, YAML config precedence, --help."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from serving.api.args import ServerArgs
from serving.cli import SECTIONS, build_parser, config_to_argv, declared_options, parse_args
from serving.engine.config import EngineArgs
from serving.options import byte_size, option
from tests.api.server_utils import REPO, repo_env

CONFIGS = REPO / "configs"


def test_defaults() -> None:
    engine, server = parse_args([])
    assert engine.model is None  # the default model
    assert server.host == "127.0.0.1" and server.port == 8000
    assert server.api_keys == [] and server.served_model_names == []
    assert server.allowed_origins == []  # no CORS unless asked
    assert server.max_request_body == 4 * 1024 * 1024
    assert engine.enable_prefix_caching is True


def test_vllm_spellings_and_forms() -> None:
    engine, server = parse_args([
        "my-model", "--max_model_len=4k", "--served-model-name", "a", "b", "--api-key", "k1",
        "--uvicorn-log-level", "debug", "--allowed-origins", '["http://x", "http://y"]',
        "--no-enable-prefix-caching", "--dtype", "float", "--gpu-memory-utilization", "0.5",
        "--max-request-body", "1MiB"])
    assert engine.model == "my-model" and engine.max_model_len == 4000
    assert engine.dtype == "float32" and engine.kv_cache_memory_fraction == 0.5
    assert engine.enable_prefix_caching is False
    assert server.served_model_names == ["a", "b"] and server.api_keys == ["k1"]
    assert server.log_level == "debug"
    assert server.allowed_origins == ["http://x", "http://y"]
    assert server.max_request_body == 1024 * 1024
    assert parse_args(["--max-model-len", "32K"])[0].max_model_len == 32768


def test_model_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args(["--model", "m1"])[0].model == "m1"
    assert parse_args(["m1", "--model", "m1"])[0].model == "m1"
    with pytest.raises(SystemExit):
        parse_args(["m1", "--model", "m2"])
    assert "two different models" in capsys.readouterr().err


def test_api_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XLASERVE_API_KEY", "from-env")
    assert parse_args([])[1].api_keys == ["from-env"]
    assert parse_args(["--api-key", "cli"])[1].api_keys == ["cli"]  # the command line wins


def test_yaml_precedence_cli_over_config_over_defaults(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: from-config\nmax-model-len: 1024\nmax_num_seqs: 4\nport: 9000\n"
                   "served-model-name: [x, y]\nenable-prefix-caching: false\n"
                   "enable_request_id_headers: true\n")
    engine, server = parse_args(["--config", str(cfg), "--port", "9100"])
    assert engine.model == "from-config"
    assert engine.max_model_len == 1024 and engine.max_num_seqs == 4  # config over defaults
    assert server.port == 9100  # command line over config
    assert server.served_model_names == ["x", "y"]
    assert engine.enable_prefix_caching is False and server.enable_request_id_headers is True
    assert server.host == "127.0.0.1"  # default kept
    # A positional model after list options is still the model; it wins over the config's.
    engine, server = parse_args(["cli-model", "--config", str(cfg), "--max-num-seqs", "8"])
    assert engine.model == "cli-model" and engine.max_num_seqs == 8
    assert server.served_model_names == ["x", "y"]


@pytest.mark.parametrize("body, message", [
    ("max-model-lenn: 10\n", "unknown option 'max-model-lenn'"),
    ("bogus_key: 1\n", "unknown option 'bogus_key'"),
    ("port: notanumber\n", "invalid int value"),
    ("enable-prefix-caching: 3\n", "must be true or false"),
    ("port: [1, 2]\n", "takes one value"),
    ("- a\n- b\n", "expected a mapping"),
    ("config: other.yaml\n", "cannot name another config"),
    ("dtype: float64\n", "invalid choice"),
])
def test_yaml_errors_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      body: str, message: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(body)
    with pytest.raises(SystemExit) as e:
        parse_args(["--config", str(cfg)])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_config_must_be_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text("{}")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(cfg)])
    assert "yaml" in capsys.readouterr().err


def test_bad_chat_template_path_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--chat-template", "/no/such/template.jinja"])
    assert "looks like a file path" in capsys.readouterr().err
    _, server = parse_args(["--chat-template", str(CONFIGS / "chat_templates/chatml.jinja")])
    assert server.chat_template is not None


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(path: Path) -> None:
    engine, server = parse_args(["--config", str(path)])
    assert engine.max_num_seqs >= 1 and server.port > 0


def test_help_documents_every_option() -> None:
    out = subprocess.run([sys.executable, "-m", "serving.cli", "--help"], capture_output=True,
                         text=True, env=repo_env(), cwd=REPO, check=True).stdout
    for action in build_parser()._actions:
        for opt in action.option_strings:
            assert opt in out, opt
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings[0]} has no help text"
    for needle in ("--host", "--api-key", "--config", "--chat-template-content-format",
                   "--trust-request-chat-template", "--max-model-len", "--enable-prefix-caching",
                   "--disable-log-requests", "--allowed-origins"):
        assert needle in out


def test_serve_convert_subcommand_reaches_the_converter(capsys: pytest.CaptureFixture[str]) -> None:
    from serving.cli import main as serve_main

    with pytest.raises(SystemExit) as e:
        serve_main(["convert", "--help"])
    assert e.value.code == 0
    assert "--output" in capsys.readouterr().out


def test_every_field_is_an_option_with_its_default_and_help(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One source of truth: the parser's defaults and help are the dataclass fields'."""
    monkeypatch.delenv("XLASERVE_API_KEY", raising=False)
    assert parse_args([]) == (EngineArgs(), ServerArgs())
    by_dest = {a.dest: a for a in build_parser()._actions}  # MODEL: the positional
    declared = {opt.field.name: opt for opt in declared_options()}
    for cls, _ in SECTIONS:
        for f in fields(cls):
            assert f.name in declared, f"{cls.__name__}.{f.name} is not an option"
    for name, opt in declared.items():
        assert by_dest[name].help == opt.spec.help, name
        assert by_dest[name].default == opt.default, name
    # --max-logprobs is declared on ServerArgs and fills EngineArgs' field of the same name.
    engine, server = parse_args(["--max-logprobs", "5"])
    assert engine.max_logprobs == server.max_logprobs == 5


@dataclass
class _NewOptions:
    """What a new field needs: its declaration, nothing else."""

    window: int | None = option(None, "Window size.", parse=byte_size, metavar="SIZE")
    turbo: bool = option(False, "Go faster.")
    cache: bool = option(True, "Cache things.", aliases=("--use-cache",))
    modes: list[str] = option(["a"], "Modes.", name="mode")
    flavour: str = option("plain", "Flavour.", choices=("plain", "spicy"), group="Taste")


def test_a_new_field_is_an_option_on_the_command_line_in_yaml_and_in_help(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser(((_NewOptions, "New"),))
    ns = parser.parse_args([])
    assert (ns.window, ns.turbo, ns.cache, ns.modes, ns.flavour) == (None, False, True, ["a"],
                                                                     "plain")
    ns = parser.parse_args(["--window", "2k", "--turbo", "--no-use-cache", "--mode", "x",
                            '["y", "z"]', "--flavour", "spicy"])
    assert (ns.window, ns.turbo, ns.cache, ns.modes, ns.flavour) == (2048, True, False,
                                                                     ["x", "y", "z"], "spicy")
    assert _NewOptions().modes is not _NewOptions().modes  # list defaults are not shared
    cfg = tmp_path / "c.yaml"
    cfg.write_text("window: 1MiB\nturbo: true\nuse_cache: false\nmode: [q]\n")
    argv, _, dests = config_to_argv(str(cfg), parser)
    ns = parser.parse_args(argv)
    assert (ns.window, ns.turbo, ns.cache, ns.modes) == (1024 * 1024, True, False, ["q"])
    assert dests == {"window", "turbo", "cache", "modes"}
    parser.print_help()
    out = capsys.readouterr().out
    for text in ("--window SIZE", "Window size.", "--turbo", "--cache, --no-cache",
                 "--use-cache", "--mode", "Modes.", "Taste:", "{plain,spicy}"):
        assert text in out, text


def test_declaration_mistakes_fail_loudly() -> None:
    @dataclass
    class Plain:
        x: int = 1

    @dataclass
    class Declares:
        x: int = option(1, "X.")

    @dataclass
    class SharesOtherDefault:
        x: int = 2

    @dataclass
    class Odd:
        x: tuple[int, int] = option((1, 2), "A pair.")

    with pytest.raises(TypeError, match=r"Plain\.x is not declared with"):
        build_parser(((Plain, "P"),))
    with pytest.raises(TypeError, match="declared twice"):
        build_parser(((Declares, "A"), (Declares, "B")))
    with pytest.raises(TypeError, match="default differs"):
        build_parser(((Declares, "A"), (SharesOtherDefault, "B")))
    @dataclass
    class ParsedList:
        x: list[str] = option([], "Items.", choices=("a", "b"))

    with pytest.raises(TypeError, match=r"needs Option\.parse"):
        build_parser(((Odd, "O"),))
    with pytest.raises(TypeError, match="are for one-value options"):
        build_parser(((ParsedList, "L"),))
    build_parser(((Declares, "A"), (Plain, "B")))  # a plain field may share a declared option


@pytest.mark.parametrize("argv, message", [
    (["--max-logprobs", "21"], "argument --max-logprobs: must be in [0, 20], got 21"),
    (["--max-logprobs", "-1"], "must be in [0, 20]"),
    (["--max-n", "0"], "argument --max-n: must be at least 1"),
    (["--max-n", "x"], "invalid int value: 'x'"),
    (["--override-pooler-config", "{bad"], "argument --override-pooler-config: Expecting"),
    (["--override-pooler-config", "[1]"], "expected a JSON object"),
    (["--override-pooler-config", '{"pool": 1}'], "unknown pooler config field 'pool'"),
    (["--allowed-origins", "[1]"], "expected a JSON list of strings"),
    (["--max-model-len", "1.5"], "not a whole number of tokens"),
    (["--max-request-body", "lots"], "invalid size 'lots'"),
    (["--enable-auto-tool-choice"], "--enable-auto-tool-choice needs --tool-call-parser"),
    (["--tool-call-parser", "nope"], "--tool-call-parser nope: unknown parser; valid names: "
                                     "hermes, llama3_json"),
    (["--tool-parser-plugin", "/no/such/plugin.py"], "tool parser plugin not found"),
    (["--reasoning-parser", "nope"], "--reasoning-parser nope: unknown parser; valid names: "
                                     "deepseek_r1, qwen3"),
])
def test_checks_declared_on_the_fields(capsys: pytest.CaptureFixture[str], argv: list[str],
                                       message: str) -> None:
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_aliases_in_yaml_and_dtype_names(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args(["--dtype", "half"])[0].dtype == "float16"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("gpu_memory_utilization: 0.5\nuvicorn-log-level: debug\ndtype: half\n"
                   "model: from-config\n")
    engine, server = parse_args(["--config", str(cfg), "--model", "from-cli"])
    assert engine.kv_cache_memory_fraction == 0.5 and server.log_level == "debug"
    assert engine.dtype == "float16" and engine.model == "from-cli"
    cfg.write_text("no-enable-prefix-caching: true\n")  # the YAML form is `...: false`
    with pytest.raises(SystemExit):
        parse_args(["--config", str(cfg)])
    assert "unknown option 'no-enable-prefix-caching'" in capsys.readouterr().err


def test_docs_name_real_options_and_their_defaults() -> None:
    """docs/SERVER.md stays true: every option it names exists, and its table of timeouts and
    limits gives the defaults the dataclasses have."""
    text = (REPO / "docs" / "SERVER.md").read_text()
    parser = build_parser()
    known = {o for a in parser._actions for o in a.option_strings}
    named = {name.replace("_", "-") for name in re.findall(r"(?<![\w-])--[a-z][\w-]*", text)
             if not name.endswith("-")}  # "--no-" is a prefix, not an option
    assert named and named <= known, sorted(named - known)
    actions = {o: a for a in parser._actions for o in a.option_strings}
    rows = re.findall(r"^\| `(--[a-z-]+)` \| ([^|]+) \|", text, flags=re.M)
    assert len(rows) >= 6
    for opt, shown in rows:
        action = actions[opt]
        value = shown.strip().removesuffix(" s").replace(" ", "")
        convert = action.type if callable(action.type) else str
        assert convert(value) == action.default, (opt, shown)


def test_tool_parser_plugin_registers_before_the_parser_is_checked(tmp_path: Path) -> None:
    """--tool-parser-plugin runs while the options are read, so --tool-call-parser can name a
    parser the plugin registers (in either order on the command line)."""
    plugin = tmp_path / "cli_plugin.py"
    plugin.write_text(
        "from serving.api.tool_parsers import register_tool_parser\n"
        "from serving.api.tool_parsers.hermes import HermesToolParser\n"
        "@register_tool_parser('cli_plugin_parser')\n"
        "class P(HermesToolParser):\n"
        "    pass\n")
    _, server = parse_args(["--enable-auto-tool-choice", "--tool-call-parser",
                            "cli_plugin_parser", "--tool-parser-plugin", str(plugin)])
    assert server.tool_call_parser == "cli_plugin_parser" and server.enable_auto_tool_choice
