"""Our encoders against transformers + torch (golden files from scripts/make_pooling_golden.py).

- MiniLM: 50 sentences, cosine >= 0.9999 per vector against sentence-transformers' recipe;
  the published pair at 0.755 +- 0.005; per-token hidden states (ALL pooling).
- The tiny random cross-encoder: sigmoid scores equal transformers' to 1e-4.
- The tiny random RoBERTa classifier (positions offset by pad_token_id + 1, a pad id inside a
  sequence, gelu_new, RoBERTa head): softmax probabilities and hidden states.
"""

from __future__ import annotations

import numpy as np

from models.inputs import PackedChunk, pack_step_inputs
from serving.engine.llm import LLM
from serving.engine.pooling_params import PoolingInput, PoolingParams
from tests.pooling.conftest import embed, load_golden


def test_minilm_tokenizer_matches_reference(minilm: LLM) -> None:
    meta, _ = load_golden("minilm")
    ours = [x.token_ids for x in minilm.processor.tokenize(meta["sentences"])]
    assert ours == meta["token_ids"]


def test_minilm_embeddings_match_transformers(minilm: LLM) -> None:
    meta, gold = load_golden("minilm")
    embs = embed(minilm, meta["token_ids"], PoolingParams(task="embed"))
    got = np.stack(embs)
    want = gold["embeddings"]
    assert got.shape == want.shape == (50, 384)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cos = np.sum(got * want, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.9999, (cos.argmin(), cos.min())
    assert np.abs(got - want).max() < 1e-4


def test_minilm_published_pair(minilm: LLM) -> None:
    a, b = embed(minilm, [x.token_ids for x in minilm.processor.tokenize(
        ["A man is eating food.", "A man is eating a piece of bread."])], PoolingParams())
    assert abs(float(a @ b) - 0.755) <= 0.005


def test_minilm_unnormalized_mean(minilm: LLM) -> None:
    meta, gold = load_golden("minilm")
    got = embed(minilm, meta["token_ids"][:4], PoolingParams(normalize=False))
    np.testing.assert_allclose(np.stack(got), gold["mean_unnormalized"][:4], atol=1e-4)
    assert abs(float(np.linalg.norm(got[0])) - 1.0) > 0.01  # really not normalised


def test_minilm_per_token_hidden_states(minilm: LLM) -> None:
    meta, gold = load_golden("minilm")
    idx = meta["hidden_of"]
    outs = embed(minilm, [meta["token_ids"][i] for i in idx], PoolingParams(task="encode"))
    for i, out in zip(idx, outs, strict=True):
        want = gold[f"hidden_{i}"]
        assert out.shape == want.shape == (len(meta["token_ids"][i]), 384)
        np.testing.assert_allclose(out, want, atol=2e-4)


def test_cross_encoder_scores_match_transformers(cross_encoder: LLM) -> None:
    meta, gold = load_golden("cross_encoder")
    inputs = cross_encoder.processor.tokenize_pairs([p[0] for p in meta["pairs"]],
                                          [p[1] for p in meta["pairs"]])
    assert [x.token_ids for x in inputs] == meta["token_ids"]
    assert [x.token_type_ids for x in inputs] == meta["token_type_ids"]
    outs = cross_encoder.encode(inputs, PoolingParams(task="score"))
    scores = np.stack([o.data for o in outs])
    assert scores.shape == (12, 1)
    np.testing.assert_allclose(scores, gold["scores"], atol=1e-4, rtol=0)
    # The fixture's scores are spread out, so this comparison can fail.
    assert np.ptp(gold["scores"]) > 0.2
    raw = cross_encoder.encode(inputs, PoolingParams(task="score", activation=False))
    np.testing.assert_allclose(np.stack([o.data for o in raw]), gold["logits"], atol=1e-4)


def test_cross_encoder_segment_ids_matter(cross_encoder: LLM) -> None:
    meta, _ = load_golden("cross_encoder")
    ids = meta["token_ids"][0]
    with_types = PoolingInput(ids, meta["token_type_ids"][0])
    without = PoolingInput(ids, None)
    a, b = cross_encoder.encode([with_types, without], PoolingParams(task="score"))
    assert abs(float(a.data[0] - b.data[0])) > 1e-3


def test_roberta_classifier_matches_transformers(roberta: LLM) -> None:
    meta, gold = load_golden("roberta")
    outs = embed(roberta, meta["token_ids"], PoolingParams(task="classify"))
    probs = np.stack(outs)
    np.testing.assert_allclose(probs, gold["probs"], atol=1e-4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    logits = embed(roberta, meta["token_ids"], PoolingParams(task="classify", activation=False))
    np.testing.assert_allclose(np.stack(logits), gold["logits"], atol=1e-4)


def test_roberta_hidden_states_match_transformers(roberta: LLM) -> None:
    """Position ids start at pad_token_id + 1 and skip pad tokens; the 64-token input uses the
    whole position table."""
    meta, gold = load_golden("roberta")
    runner = roberta.engine.runner
    clf = runner._model(runner.state)
    for i, seq in enumerate(meta["token_ids"]):
        inp = pack_step_inputs([PackedChunk(seq, 0, ())], len(seq), 1, 0, 16)
        hidden, _ = clf.encoder([], inp)
        np.testing.assert_allclose(np.asarray(hidden), gold[f"hidden_{i}"], atol=1e-4)
