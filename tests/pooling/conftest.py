"""Shared fixtures for the pooling tests: pooling engines on small bucket sets, golden files.

Encoders: MiniLM, the tiny cross-encoder, the tiny RoBERTa classifier. Decoder embeddings:
SmolLM2-135M-Instruct (the default GGUF asset), float32. Every one is the one engine
(``serving.engine.engine.LLMEngine``) behind the offline ``LLM`` API, with few token buckets:
the XLA CPU compiler needs ~1-2 s per executable. The JAX persistent compilation cache makes
reruns fast. ``serve`` builds the same engine (``tests/pooling/test_*_http.py``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest

from models import assets
from serving.engine.engine import LLMEngine
from serving.engine.engine_client import AsyncEngineClient
from serving.engine.llm import LLM
from serving.engine.pooling_params import PoolingInput, PoolingParams

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "pooling"
FIXTURES = ROOT / "tests" / "fixtures"
CROSS_ENCODER = FIXTURES / "tiny-bert-cross-encoder"
ROBERTA = FIXTURES / "tiny-roberta-cls3"


def load_golden(name: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    meta = json.loads((GOLDEN / f"{name}.json").read_text())
    with np.load(GOLDEN / f"{name}.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return meta, arrays


def assert_error(r: httpx.Response, status: int, fragment: str) -> None:
    """An OpenAI-shaped error with this status whose message contains ``fragment``."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"], err
    assert err["code"] == status


def assert_pooling_only_server(http: httpx.Client, model: str, max_model_len: int) -> None:
    """A pooling server refuses the generate and classify routes with OpenAI-shaped 400s and
    still lists its model, reports healthy and serves metrics."""
    assert_error(http.post("/v1/completions", json={"prompt": "hi"}), 400,
                 "The model does not support Completions API")
    assert_error(http.post("/v1/chat/completions",
                           json={"messages": [{"role": "user", "content": "hi"}]}), 400,
                 "The model does not support Chat Completions API")
    assert_error(http.post("/classify", json={"input": "hi"}), 400,
                 "The model does not support Classification API")
    models = http.get("/v1/models").json()
    assert models["data"][0]["id"] == model
    assert models["data"][0]["max_model_len"] == max_model_len
    assert http.get("/health").status_code == 200
    assert "xlaserve:num_requests_running" in http.get("/metrics").text


def make_engine(model: str | Path, *, max_model_len: int, max_num_seqs: int,
                token_buckets: tuple[int, ...], max_num_batched_tokens: int, task: str = "auto",
                attention_backend: str = "reference", **kw: Any) -> LLM:
    """A pooling engine on ``model`` with exactly these token buckets (plus the budget)."""
    return LLM(str(model), task=task, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
               max_num_batched_tokens=max_num_batched_tokens, token_buckets=token_buckets,
               dtype="float32", attention_backend=attention_backend, **kw)


def embed(llm: LLM, token_ids: list[list[int]], params: PoolingParams | None = None
          ) -> list[np.ndarray]:
    """Pool each token-id list; one array per input (shape per task)."""
    return [o.data for o in llm.encode([PoolingInput(list(x)) for x in token_ids],
                                       params or PoolingParams())]


def steps_of(llm: LLM) -> int:
    return llm.engine.get_stats().num_steps


def run_async(engine: LLMEngine, scenario: Callable[[AsyncEngineClient], Awaitable[T]]) -> T:
    """Run ``scenario`` against an ``AsyncEngineClient`` over ``engine`` (its thread is
    stopped afterwards, so the offline API can drive the engine again)."""
    async def main() -> T:
        client = AsyncEngineClient(engine)
        await client.start()
        try:
            return await scenario(client)
        finally:
            await client.shutdown(drain_timeout=5)
    return asyncio.run(main())


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return Path(assets.fetch("all-minilm-l6-v2"))


@pytest.fixture(scope="session")
def minilm(minilm_dir: Path) -> LLM:
    """MiniLM, max_model_len 256, 32 sequences a step, buckets T in {64, 256, 2048}."""
    return make_engine(minilm_dir, max_model_len=256, max_num_seqs=32,
                       token_buckets=(64, 256), max_num_batched_tokens=2048)


@pytest.fixture(scope="session")
def cross_encoder() -> LLM:
    return make_engine(CROSS_ENCODER, max_model_len=128, max_num_seqs=16, token_buckets=(32,),
                       max_num_batched_tokens=512)


@pytest.fixture(scope="session")
def roberta() -> LLM:
    return make_engine(ROBERTA, max_model_len=64, max_num_seqs=8, token_buckets=(),
                       max_num_batched_tokens=512)


@pytest.fixture(scope="session")
def smollm2_embed() -> LLM:
    """SmolLM2 as an embedding model (LAST + normalize), max_model_len 256, 32 sequences a
    step, buckets T in {64, 512, 2048}."""
    return make_engine("smollm2-135m-instruct", task="embed", max_model_len=256,
                       max_num_seqs=32, token_buckets=(64, 512), max_num_batched_tokens=2048)
