"""Shared fixtures for the pooling tests: engines on small bucket sets, and the golden files.

Engines here are built directly (not through ``from_args``) so that each compiles only a few
buckets: the XLA CPU compiler needs ~1-2 s per executable. The JAX persistent compilation cache
makes reruns fast.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models import assets
from models.bert import load_bert, read_config
from models.pooling import resolve_pooler_config
from serving.engine.engine import enable_compilation_cache
from serving.engine.pooling_engine import PoolingEngine, load_tokenizer
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
    tokenizer = load_tokenizer(model_dir) if (model_dir / "tokenizer.json").exists() else None
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
