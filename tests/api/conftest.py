"""Fixtures: the real HTTP server around the fake engine (shaping/validation tests)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.fake_engine import load_smollm2_tokenizer
from tests.api.server_utils import ServerProcess, fake_server


@pytest.fixture(scope="session")
def smollm2_tokenizer():  # type: ignore[no-untyped-def]
    return load_smollm2_tokenizer()


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory,
         smollm2_tokenizer) -> Iterator[ServerProcess]:  # type: ignore[no-untyped-def]
    """Default options, 10 ms per fake step (so a 400-token request lasts a few seconds)."""
    tmp = tmp_path_factory.mktemp("fake")
    server = fake_server(tmp, "--max-model-len", "512", "--max-n", "8",
                         "--max-request-body", "64k", XLASERVE_FAKE_STEP_S="0.01").start(120)
    yield server
    server.stop()


@pytest.fixture
def http(fake: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.base_url, timeout=60) as client:
        yield client


def good_request_still_works(client: httpx.Client) -> None:
    """After any bad request: the server still answers a normal one correctly."""
    r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3,
                                              "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "The capital of"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
