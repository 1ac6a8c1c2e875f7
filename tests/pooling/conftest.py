"""Shared fixtures for the pooling tests: engines on small bucket sets, and the golden files.

Encoders: MiniLM, the tiny cross-encoder, the tiny RoBERTa classifier. Decoder embeddings:
SmolLM2-135M-Instruct (the default GGUF asset) on the decoder runner, float32.

Engines here are built directly (not through ``from_args``) so that each compiles only a few
buckets: the XLA CPU compiler needs ~1-2 s per executable. The JAX persistent compilation cache
makes reruns fast.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest

from models import assets
from models.bert import load_bert, read_config
from models.hf_dir import encoder_tokenizer
from models.loader import resolve_source
from models.pooling import resolve_pooler_config
from serving.engine.engine import enable_compilation_cache
from serving.engine.pooling_decoder import load_decoder_pooling
from serving.engine.pooling_engine import PoolingEngine
from serving.engine.pooling_runner import PoolingRunner

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


def make_engine(model_dir: Path, *, max_model_len: int, token_buckets: list[int],
                seq_buckets: list[int], hidden_max_seqs: int = 8,
                max_num_batched_tokens: int | None = None) -> PoolingEngine:
    enable_compilation_cache(None)
    cfg = read_config(model_dir)
    pooler = resolve_pooler_config(model_dir)
    runner = PoolingRunner(
        load_bert(model_dir), pooler.pooling_type, max_model_len=max_model_len,
        max_num_seqs=max(seq_buckets), token_buckets=token_buckets, seq_buckets=seq_buckets,
        hidden_max_seqs=hidden_max_seqs, max_num_batched_tokens=max_num_batched_tokens)
    tokenizer = encoder_tokenizer(model_dir) if (model_dir / "tokenizer.json").exists() else None
    engine = PoolingEngine(runner, cfg, pooler, tokenizer, model_name=model_dir.name)
    engine.start_thread()
    return engine


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return Path(assets.fetch("all-minilm-l6-v2"))


@pytest.fixture(scope="session")
def minilm(minilm_dir: Path) -> Iterator[PoolingEngine]:
    """MiniLM, max_model_len 256, buckets T in {32, 64, 256} x S in {1, 8, 32}."""
    engine = make_engine(minilm_dir, max_model_len=256, token_buckets=[32, 64, 256],
                         seq_buckets=[1, 8, 32])
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def cross_encoder() -> Iterator[PoolingEngine]:
    engine = make_engine(CROSS_ENCODER, max_model_len=128, token_buckets=[32, 128],
                         seq_buckets=[1, 4, 16])
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def roberta() -> Iterator[PoolingEngine]:
    engine = make_engine(ROBERTA, max_model_len=64, token_buckets=[64], seq_buckets=[1, 8])
    yield engine
    engine.close()


def make_decoder_engine(model: str, *, max_model_len: int, override: str | None = None,
                        **runner_options: Any) -> PoolingEngine:
    """A decoder embedding engine (``load_decoder_pooling``, as ``serve --task embed`` builds
    it) with the runner's buckets from ``runner_options``; float32, started."""
    enable_compilation_cache(None)
    args = SimpleNamespace(model=model, task="embed", override_pooler_config=override,
                           attention_backend="reference")
    runner, cfg, pooler, tokenizer, name = load_decoder_pooling(
        args, resolve_source(model), dtype="float32", max_model_len=max_model_len,
        runner_options=runner_options)
    engine = PoolingEngine(runner, cfg, pooler, tokenizer, model_name=name)
    engine.start_thread()
    return engine


@pytest.fixture(scope="session")
def smollm2_embed() -> Iterator[PoolingEngine]:
    """SmolLM2 as an embedding model (LAST + normalize), max_model_len 256: batches on T in
    {64, 256} x S in {1, 8, 32}, compiled as packed steps of P in {64, 512, 2048} tokens."""
    engine = make_decoder_engine(
        "smollm2-135m-instruct", max_model_len=256, token_buckets=[64, 256],
        seq_buckets=[1, 8, 32], max_num_batched_tokens=2048,
        packed_token_buckets=[64, 512, 2048])
    yield engine
    engine.close()
