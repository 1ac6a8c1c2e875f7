"""Our encoders against transformers + torch (golden files from scripts/make_pooling_golden.py).

- MiniLM: 50 sentences, cosine >= 0.9999 per vector against sentence-transformers' recipe;
  the published pair at 0.755 +- 0.005; per-token hidden states (ALL pooling).
- The tiny random cross-encoder: sigmoid scores equal transformers' to 1e-4.
- The tiny random RoBERTa classifier (positions offset by pad_token_id + 1, a pad id inside a
  sequence, gelu_new, RoBERTa head): softmax probabilities and hidden states.
"""

from __future__ import annotations

import asyncio

import numpy as np

from serving.engine.pooling_engine import PoolingEngine, PoolingInput
from serving.engine.pooling_params import PoolingParams
from tests.pooling.conftest import load_golden


def test_minilm_tokenizer_matches_reference(minilm: PoolingEngine) -> None:
    meta, _ = load_golden("minilm")
    ours = [x.token_ids for x in minilm.tokenize(meta["sentences"])]
    assert ours == meta["token_ids"]


def test_minilm_embeddings_match_transformers(minilm: PoolingEngine) -> None:
    meta, gold = load_golden("minilm")
    embs = asyncio.run(minilm.embed(meta["token_ids"], PoolingParams(task="embed")))
    got = np.stack(embs)
    want = gold["embeddings"]
    assert got.shape == want.shape == (50, 384)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cos = np.sum(got * want, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.9999, (cos.argmin(), cos.min())
    assert np.abs(got - want).max() < 1e-4


def test_minilm_published_pair(minilm: PoolingEngine) -> None:
    a, b = asyncio.run(minilm.embed(
        [x.token_ids for x in minilm.tokenize(["A man is eating food.",
                                                "A man is eating a piece of bread."])],
        PoolingParams()))
    assert abs(float(a @ b) - 0.755) <= 0.005


def test_minilm_unnormalized_mean(minilm: PoolingEngine) -> None:
    meta, gold = load_golden("minilm")
    got = asyncio.run(minilm.embed(meta["token_ids"][:4], PoolingParams(normalize=False)))
    np.testing.assert_allclose(np.stack(got), gold["mean_unnormalized"][:4], atol=1e-4)
    assert abs(float(np.linalg.norm(got[0])) - 1.0) > 0.01  # really not normalised


def test_minilm_per_token_hidden_states(minilm: PoolingEngine) -> None:
    meta, gold = load_golden("minilm")
    idx = meta["hidden_of"]
    outs = asyncio.run(minilm.embed([meta["token_ids"][i] for i in idx],
                                    PoolingParams(task="encode")))
    for i, out in zip(idx, outs, strict=True):
        want = gold[f"hidden_{i}"]
        assert out.shape == want.shape == (len(meta["token_ids"][i]), 384)
        np.testing.assert_allclose(out, want, atol=2e-4)


def test_cross_encoder_scores_match_transformers(cross_encoder: PoolingEngine) -> None:
    meta, gold = load_golden("cross_encoder")
    inputs = cross_encoder.tokenize_pairs([p[0] for p in meta["pairs"]],
                                          [p[1] for p in meta["pairs"]])
    assert [x.token_ids for x in inputs] == meta["token_ids"]
    assert [x.token_type_ids for x in inputs] == meta["token_type_ids"]
    outs = asyncio.run(cross_encoder.encode(inputs, PoolingParams(task="score")))
    scores = np.stack([o.data for o in outs])
    assert scores.shape == (12, 1)
    np.testing.assert_allclose(scores, gold["scores"], atol=1e-4, rtol=0)
    # The fixture's scores are spread out, so this comparison can fail.
    assert np.ptp(gold["scores"]) > 0.2
    raw = asyncio.run(cross_encoder.encode(inputs, PoolingParams(task="score",
                                                                 activation=False)))
    np.testing.assert_allclose(np.stack([o.data for o in raw]), gold["logits"], atol=1e-4)


def test_cross_encoder_segment_ids_matter(cross_encoder: PoolingEngine) -> None:
    meta, _ = load_golden("cross_encoder")
    ids = meta["token_ids"][0]
    with_types = PoolingInput(ids, meta["token_type_ids"][0])
    without = PoolingInput(ids, None)
    a, b = asyncio.run(cross_encoder.encode([with_types, without], PoolingParams(task="score")))
    assert abs(float(a.data[0] - b.data[0])) > 1e-3


def test_roberta_classifier_matches_transformers(roberta: PoolingEngine) -> None:
    meta, gold = load_golden("roberta")
    outs = asyncio.run(roberta.embed(meta["token_ids"], PoolingParams(task="classify")))
    probs = np.stack(outs)
    np.testing.assert_allclose(probs, gold["probs"], atol=1e-4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    logits = asyncio.run(roberta.embed(meta["token_ids"],
                                       PoolingParams(task="classify", activation=False)))
    np.testing.assert_allclose(np.stack(logits), gold["logits"], atol=1e-4)


def test_roberta_hidden_states_match_transformers(roberta: PoolingEngine) -> None:
    """Position ids start at pad_token_id + 1 and skip pad tokens; the 64-token input uses the
    whole position table."""
    meta, gold = load_golden("roberta")
    model = roberta.runner._graphdef, roberta.runner._state
    from flax import nnx

    clf = nnx.merge(*model)
    for i, seq in enumerate(meta["token_ids"]):
        ids = np.array([seq], np.int32)
        hidden = clf.encoder(ids, np.zeros_like(ids), np.array([len(seq)], np.int32))
        np.testing.assert_allclose(np.asarray(hidden[0]), gold[f"hidden_{i}"], atol=1e-4)
