"""``serve`` option parsing: defaults, vLLM spellings, YAML config precedence, --help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from serving.cli import build_parser, parse_args
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
