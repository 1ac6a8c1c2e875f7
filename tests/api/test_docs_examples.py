"""docs/SERVER.md's SDK and curl examples, run as written against a live ``serve``.

The server here uses the shipped list-content template (``chatml-parts.jinja``), so this module
also checks the 'openai' content-format detection end to end (test_e2e_server.py checks the
'string' one with the model's own template).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.api.server_utils import REPO, ServerProcess, real_server, repo_env

DOC = REPO / "docs" / "SERVER.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("docs")
    s = real_server(tmp, "--chat-template", "configs/chat_templates/chatml-parts.jinja",
                    "--max-model-len", "2048", "--max-num-seqs", "16",
                    "--enable-request-id-headers", name="docs").start(900)
    yield s
    assert s.stop() == 0


def localize(code: str, server: ServerProcess) -> str:
    return code.replace("http://localhost:8000", server.base_url)


def test_list_template_detected(server: ServerProcess) -> None:
    assert "Detected the chat template content format to be 'openai'" in server.log()


def test_sdk_example(server: ServerProcess) -> None:
    (code,) = blocks("python")
    out = subprocess.run([sys.executable, "-c", localize(code, server)], capture_output=True,
                         text=True, env=repo_env(), timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "Paris" in lines[0]  # the chat answer
    assert re.search(r"\[\d+ tokens\]", out.stdout)  # the stream's usage chunk
    assert "x-request-id: docs-example-1" in out.stdout
    assert "cmpl-docs-example-1" in out.stdout


@pytest.mark.parametrize("index", range(len(blocks("bash")) - 1))
def test_curl_examples(server: ServerProcess, index: int) -> None:
    code = blocks("bash")[index + 1]  # the first bash block is the install/start commands
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", localize(code, server)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    text = out.stdout.strip()
    assert text
    if text.startswith("data: "):  # the streaming example
        lines = [line for line in text.splitlines() if line]
        assert lines[-1] == "data: [DONE]"
        content = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "")
                          for line in lines[:-1] if json.loads(line[6:])["choices"])
        assert content
    elif code.count("curl ") == 1:
        body = json.loads(text)
        assert "error" not in body and body["choices"]
    else:  # the tokenize/models/health/metrics block: outputs run together on one line
        assert '"token_strs":[' in text and '"object":"list"' in text
        assert "200\n" in text and "xlaserve:num_requests_running" in text


def test_start_commands_are_documented() -> None:
    first = blocks("bash")[0]
    assert "pip install -e ." in first and re.search(r"^serve\b", first, flags=re.M)
