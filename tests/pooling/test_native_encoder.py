"""BERT-family encoders on the native CPU GEMM (``models.bert.pack_encoder_linears``, the
``native`` backend) against the same transformers goldens and tolerances as the reference path
(``test_golden.py``): MiniLM embeddings and per-token hidden states, the tiny cross-encoder
(whose BERT pooler is packed too) and the tiny RoBERTa classifier.

Skipped only on a host that cannot build the kernels (``tests.ops.native_host``); elsewhere a
missing kernel fails.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.bert import BertForSequenceClassification, BertModel
from ops import native
from serving.engine.llm import LLM
from serving.engine.pooling_params import PoolingParams
from tests.ops.native_host import native_available
from tests.pooling.conftest import CROSS_ENCODER, ROBERTA, embed, load_golden, make_engine

pytestmark = pytest.mark.skipif(not native_available(), reason="no native CPU kernels here")


def _model(llm: LLM) -> BertModel | BertForSequenceClassification:
    runner = llm.engine.runner
    model = runner._model(runner.state)
    assert isinstance(model, BertModel | BertForSequenceClassification)
    return model


def _assert_packed(llm: LLM) -> None:
    """Every layer (and a classifier's pooler) runs the packed GEMM, weights in panels."""
    model = _model(llm)
    encoder = model.encoder if isinstance(model, BertForSequenceClassification) else model
    d, f = encoder.cfg.hidden_size, encoder.cfg.intermediate_size
    for layer in encoder.layers:
        assert layer.linear is not None
        assert layer.w_qkv.shape == (3 * d // native.PANEL, d, native.PANEL)
        assert layer.w_o.shape == (d // native.PANEL, d, native.PANEL)
        assert layer.w_in.shape == (f // native.PANEL, d, native.PANEL)
        assert layer.w_out.shape == (d // native.PANEL, f, native.PANEL)
        assert str(layer.w_in[...].dtype) == "float32"  # whatever --cpu-weight-dtype says
    if isinstance(model, BertForSequenceClassification):
        assert model.linear is not None
        assert model.w_pool.shape == (d // native.PANEL, d, native.PANEL)


@pytest.fixture(scope="module")
def minilm_native(minilm_dir: Path) -> LLM:
    return make_engine(minilm_dir, max_model_len=256, max_num_seqs=32, token_buckets=(64, 256),
                       max_num_batched_tokens=2048, attention_backend="native")


def test_minilm_native_matches_transformers(minilm_native: LLM) -> None:
    _assert_packed(minilm_native)
    meta, gold = load_golden("minilm")
    got = np.stack(embed(minilm_native, meta["token_ids"], PoolingParams(task="embed")))
    want = gold["embeddings"]
    assert got.shape == want.shape == (50, 384)
    cos = np.sum(got * want, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.9999, (cos.argmin(), cos.min())
    assert np.abs(got - want).max() < 1e-4
    idx = meta["hidden_of"]
    outs = embed(minilm_native, [meta["token_ids"][i] for i in idx],
                 PoolingParams(task="encode"))
    for i, out in zip(idx, outs, strict=True):
        np.testing.assert_allclose(out, gold[f"hidden_{i}"], atol=2e-4)


def test_cross_encoder_native_matches_transformers() -> None:
    llm = make_engine(CROSS_ENCODER, max_model_len=128, max_num_seqs=16, token_buckets=(32,),
                      max_num_batched_tokens=512, attention_backend="native")
    _assert_packed(llm)
    meta, gold = load_golden("cross_encoder")
    inputs = llm.processor.tokenize_pairs([p[0] for p in meta["pairs"]],
                                          [p[1] for p in meta["pairs"]])
    raw = llm.encode(inputs, PoolingParams(task="score", activation=False))
    np.testing.assert_allclose(np.stack([o.data for o in raw]), gold["logits"], atol=1e-4)


def test_roberta_native_matches_transformers() -> None:
    llm = make_engine(ROBERTA, max_model_len=64, max_num_seqs=8, token_buckets=(),
                      max_num_batched_tokens=512, attention_backend="native")
    _assert_packed(llm)
    meta, gold = load_golden("roberta")
    logits = embed(llm, meta["token_ids"], PoolingParams(task="classify", activation=False))
    np.testing.assert_allclose(np.stack(logits), gold["logits"], atol=1e-4)
