"""Decoder (Llama-family) embeddings: the packed causal runner, SmolLM2 against transformers,
batch invariance, no recompiles, engine selection and refusals.

- Tiny random Llama and Gemma 3 (``models.testing``; Gemma's sliding window of 24 is shorter
  than the longest input): every sequence of a packed step equals a dense causal forward of that
  sequence alone (``tests.engine.dense``), for the per-token states and LAST / MEAN / CLS.
- SmolLM2-135M-Instruct against transformers + torch (``tests/golden/pooling/smollm2_embed.*``
  from ``scripts/make_decoder_embed_golden.py``): normalised last-token embeddings within
  cosine 0.9999 and |delta| <= EMB_ATOL; raw states within STATE_ATOL.
- A sequence alone and inside a batch of 32 of different lengths: identical within 1e-5.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.pooling import PoolingType
from models.registry import LoadedModel, ModelLoadError
from models.testing import tiny_loaded
from serving.engine.pooling_decoder import (
    DecoderPoolingRunner,
    check_decoder_embedding_source,
    packed_buckets,
)
from serving.engine.pooling_engine import PoolingEngine, wants_pooling_engine
from serving.engine.pooling_params import PoolingParams
from tests.engine.dense import dense_attention, dense_write
from tests.pooling.conftest import load_golden
from tests.utils import single_seq_inputs

# Normalised embeddings (unit vectors, float32) vs transformers: measured max |delta| ~1e-6.
EMB_ATOL = 1e-5
# Raw final hidden states (entries up to ~34 for SmolLM2): measured max |delta| ~5e-5.
STATE_ATOL = 5e-4
# Tiny random models vs the dense forward.
TINY_ATOL = 5e-5
LENGTHS = (1, 5, 17, 40, 33, 2, 16, 9)  # 123 tokens: one packed step of P = 128


def _tiny_runner(ld: LoadedModel, pooling: PoolingType = PoolingType.LAST
                 ) -> DecoderPoolingRunner:
    """Batches on T in {16, 64} x S in {1, 4, 8} within 128 tokens; packed P in {32, 128}."""
    return DecoderPoolingRunner(ld.model, ld.config, pooling, max_model_len=64,
                                token_buckets=[16, 64], seq_buckets=[1, 4, 8],
                                max_num_batched_tokens=128, packed_token_buckets=[32])


@functools.cache
def _dense_model(model_type: str) -> LoadedModel:
    """The tiny model (same seed, same weights) with dense causal attention."""
    return tiny_loaded(model_type, attn_fn=dense_attention, write_fn=dense_write)


def _dense_states(model_type: str, seq: list[int]) -> np.ndarray:
    """Final-normed hidden states of ``seq`` alone through plain causal attention."""
    dense = _dense_model(model_type)
    kv = [(jnp.zeros(1), jnp.zeros(1)) for _ in range(dense.config.num_layers)]
    pages = -(-len(seq) // 16)
    h, _ = dense.model(kv, single_seq_inputs(seq, 0, list(range(1, pages + 1)), 16, pages))
    return np.asarray(h)


def _seqs(lengths: tuple[int, ...] = LENGTHS, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, 256, n)] for n in lengths]


# ------------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_packed_step_matches_dense_forward(model_type: str) -> None:
    runner = _tiny_runner(tiny_loaded(model_type))
    seqs = _seqs()
    pooled = runner.run("pooled", seqs)
    hidden = runner.run("hidden", seqs)
    assert runner.step_shape("pooled", LENGTHS) == ((8, 128), 128)
    for seq, p, h in zip(seqs, pooled, hidden, strict=True):
        want = _dense_states(model_type, seq)
        assert h.shape == want.shape == (len(seq), runner.hidden_size)
        np.testing.assert_allclose(h, want, atol=TINY_ATOL, rtol=0)
        np.testing.assert_allclose(p, want[-1], atol=TINY_ATOL, rtol=0)


@pytest.mark.parametrize("pooling", [PoolingType.MEAN, PoolingType.CLS])
def test_mean_and_first_token_pooling(pooling: PoolingType) -> None:
    runner = _tiny_runner(tiny_loaded("llama"), pooling)
    seqs = _seqs(seed=1)
    for seq, p in zip(seqs, runner.run("pooled", seqs), strict=True):
        want = _dense_states("llama", seq)
        ref = want.mean(0) if pooling == PoolingType.MEAN else want[0]
        np.testing.assert_allclose(p, ref, atol=TINY_ATOL, rtol=0)


def test_packed_layout() -> None:
    runner = _tiny_runner(tiny_loaded("llama"))
    assert runner.shapes("pooled") == [(8, 32), (8, 128)]
    assert runner.shapes("hidden") == [(8, 32), (8, 128)]
    inp = runner.pack("pooled", _seqs())
    b = runner.page_size
    n = sum(LENGTHS)
    assert inp.token_ids.shape == (128,) and inp.page_table.shape == (8, 4)
    np.testing.assert_array_equal(inp.cu_q_lens, np.cumsum((0, *LENGTHS)))
    np.testing.assert_array_equal(inp.kv_lens, LENGTHS)
    assert (inp.slot_mapping[n:] == -1).all() and (inp.slot_mapping[:n] >= b).all()
    assert len(set(inp.slot_mapping[:n].tolist())) == n  # no two tokens share a slot
    assert inp.slot_mapping.max() < runner.num_pages * b
    used = [set(row[row > 0].tolist()) for row in inp.page_table]
    assert sum(map(len, used)) == len(set().union(*used))  # pages are not shared
    for i, n_i in enumerate(LENGTHS):  # positions restart at 0 for every sequence
        lo = inp.cu_q_lens[i]
        np.testing.assert_array_equal(inp.positions[lo:lo + n_i], np.arange(n_i))
    # The smallest packed bucket that holds the real tokens; too many is an error.
    assert runner.step_shape("pooled", [3, 9]) == ((8, 32), 32)
    assert runner.step_shape("pooled", [30, 3]) == ((8, 128), 128)
    with pytest.raises(ValueError, match="do not fit"):
        runner.step_shape("pooled", [64, 64, 1])
    assert packed_buckets(100) == [16, 32, 64, 100]


def test_warmup_compiles_everything_and_the_kv_cache_is_donated_state() -> None:
    runner = _tiny_runner(tiny_loaded("llama"))
    runner.warmup()
    compiled = runner.num_compiles
    assert compiled == sum(len(runner.shapes(k)) for k in runner.kinds) == 4
    before = runner._kv[0][0]
    for lengths in ((1,), (64,), (16, 16, 16, 16), LENGTHS, (2,) * 8):
        for kind in runner.kinds:
            runner.run(kind, _seqs(lengths))
    assert runner.num_compiles == compiled and runner.num_recompiles == 0
    after = runner._kv[0][0]
    assert after is not before and after.shape == before.shape  # returned, never grown
    assert before.is_deleted()  # donated to the step


# ------------------------------------------------------------------------------- SmolLM2


def test_smollm2_tokenizer_matches_reference(smollm2_embed: PoolingEngine) -> None:
    meta, _ = load_golden("smollm2_embed")
    assert [x.token_ids for x in smollm2_embed.tokenize(meta["sentences"])] == meta["token_ids"]


def test_smollm2_embeddings_match_transformers(smollm2_embed: PoolingEngine) -> None:
    meta, gold = load_golden("smollm2_embed")
    assert smollm2_embed.pooler_config.pooling_type == PoolingType.LAST
    assert smollm2_embed.pooler_config.normalize
    got = np.stack(asyncio.run(smollm2_embed.embed(meta["token_ids"], PoolingParams())))
    want = gold["embeddings"]
    assert got.shape == want.shape == (8, 576)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cos = np.sum(got * want, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.9999, (cos.argmin(), cos.min())
    assert np.abs(got - want).max() <= EMB_ATOL
    raw = asyncio.run(smollm2_embed.embed(meta["token_ids"], PoolingParams(normalize=False)))
    np.testing.assert_allclose(np.stack(raw), gold["last_unnormalized"], atol=STATE_ATOL,
                               rtol=0)


def test_smollm2_per_token_states_and_other_poolers(smollm2_embed: PoolingEngine) -> None:
    """``/pooling``'s per-token states; MEAN and first-token (CLS) pooling on the same weights
    (a second runner, compiled lazily for the one packed shape it runs)."""
    meta, gold = load_golden("smollm2_embed")
    idx = meta["hidden_of"]
    outs = asyncio.run(smollm2_embed.embed([meta["token_ids"][i] for i in idx],
                                           PoolingParams(task="encode")))
    for i, out in zip(idx, outs, strict=True):
        assert out.shape == gold[f"hidden_{i}"].shape == (len(meta["token_ids"][i]), 576)
        np.testing.assert_allclose(out, gold[f"hidden_{i}"], atol=STATE_ATOL, rtol=0)
    base = smollm2_embed.runner
    assert isinstance(base, DecoderPoolingRunner)
    model = nnx.merge(base.graphdef, base._state_template)
    for pooling, key in ((PoolingType.MEAN, "mean_unnormalized"),
                         (PoolingType.CLS, "first_unnormalized")):
        runner = DecoderPoolingRunner(model, base.model_cfg, pooling, max_model_len=64,
                                      token_buckets=[64], seq_buckets=[1, 8],
                                      max_num_batched_tokens=512)
        got = np.stack(runner.run("pooled", meta["token_ids"]))  # one step of 256 tokens
        assert runner.num_compiles == 1
        np.testing.assert_allclose(got, gold[key], atol=STATE_ATOL, rtol=0)


def _others(n: int) -> list[list[int]]:
    """n token-id lists of lengths 2..64, all different from each other where possible."""
    rng = np.random.default_rng(7)
    lengths = [2 + (5 * i) % 63 for i in range(n)]
    return [[int(t) for t in rng.integers(100, 40000, k)] for k in lengths]


def test_smollm2_batch_invariance(smollm2_embed: PoolingEngine) -> None:
    meta, _ = load_golden("smollm2_embed")
    target = meta["token_ids"][4]  # "What is the capital of France?"
    before = Counter(smollm2_embed.step_sizes)
    (alone,) = asyncio.run(smollm2_embed.embed([target], PoolingParams()))
    others = _others(31)
    assert len({len(x) for x in others}) == 31
    for pos in (0, 17, 31):
        batch = [*others[:pos], target, *others[pos:]]
        outs = asyncio.run(smollm2_embed.embed(batch, PoolingParams()))
        np.testing.assert_allclose(outs[pos], alone, atol=1e-5, rtol=0)
    steps = Counter(smollm2_embed.step_sizes)
    steps.subtract(before)
    # Alone: the 64-token step; each batch of 32 (~1000 tokens): one 2048-token step.
    assert +steps == Counter({(32, 64): 1, (32, 2048): 3})
    st = smollm2_embed.stats()
    assert st.num_recompiles == 0
    assert st.num_compiles == sum(len(smollm2_embed.runner.shapes(k))
                                  for k in smollm2_embed.runner.kinds) == 6


def test_smollm2_truncation_keeps_the_end(smollm2_embed: PoolingEngine) -> None:
    text = "one two three four five six seven"
    full = smollm2_embed.tokenize([text])[0].token_ids
    (cut,) = smollm2_embed.tokenize([text], truncate_prompt_tokens=3)
    assert cut.token_ids == full[-3:]
    a = asyncio.run(smollm2_embed.embed([full], PoolingParams(truncate_prompt_tokens=3)))
    b = asyncio.run(smollm2_embed.embed([full[-3:]], PoolingParams()))
    np.testing.assert_array_equal(a[0], b[0])


# ------------------------------------------------------------------------------- selection


def _args(model: str | None, **kw: Any) -> SimpleNamespace:
    base: dict[str, Any] = dict(model=model, task="embed", tokenizer=None, dtype="float32",
                                max_model_len=64, max_num_seqs=2, max_num_batched_tokens=None,
                                cache_dir=None, compilation_cache=False,
                                override_pooler_config=None)
    return SimpleNamespace(**{**base, **kw})


def test_from_args_serves_a_decoder_with_task_embed() -> None:
    assert wants_pooling_engine(_args("smollm2-135m-instruct"))
    assert wants_pooling_engine(_args(None, task="embedding"))
    assert not wants_pooling_engine(_args("smollm2-135m-instruct", task="auto"))
    assert not wants_pooling_engine(_args("smollm2-135m-instruct", task="generate"))
    engine = PoolingEngine.from_args(_args(None), warmup=False)  # the default asset
    assert isinstance(engine.runner, DecoderPoolingRunner)
    assert engine.model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert engine.info.tasks == ("embed", "encode") and engine.info.hidden_size == 576
    assert engine.max_model_len == 64 and engine.runner.token_buckets == [16, 32, 64]
    assert engine.pooler_config.pooling_type == PoolingType.LAST
    assert engine.pooler_config.normalize and engine.pooler_config.source == "default"
    assert engine.tokenizer.truncation_side == "left"
    assert engine.runner.num_compiles == 0  # warmup=False
    over = PoolingEngine.from_args(_args(
        "smollm2-135m-instruct",
        override_pooler_config='{"pooling_type": "MEAN", "normalize": false}'), warmup=False)
    assert over.pooler_config.pooling_type == PoolingType.MEAN
    assert not over.pooler_config.normalize and over.pooler_config.source == "override"
    assert isinstance(over.runner, DecoderPoolingRunner)
    assert over.runner.pooling_type == PoolingType.MEAN


def _llama_config(**kw: Any) -> dict[str, Any]:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 64,
            "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, **kw}


@pytest.mark.parametrize("cfg, match", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]},
     "unsupported architecture 'GPT2LMHeadModel'"),
    (_llama_config(use_bidirectional_attention=True), "bidirectional attention"),
    (_llama_config(is_causal=False), "bidirectional attention"),
    (_llama_config(architectures=["LlamaForSequenceClassification"]),
     "LlamaForSequenceClassification"),
])
def test_decoder_checkpoints_refused_before_loading(tmp_path: Path, cfg: dict[str, Any],
                                                    match: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(cfg))  # no weights: refused before
    with pytest.raises(ModelLoadError, match=match):
        check_decoder_embedding_source(tmp_path)
    assert wants_pooling_engine(_args(str(tmp_path)))
    with pytest.raises(ModelLoadError, match=match):
        PoolingEngine.from_args(_args(str(tmp_path)), warmup=False)


def test_decoder_task_refusals() -> None:
    for task in ("classify", "score"):
        with pytest.raises(ModelLoadError, match="needs a BERT-family cross-encoder"):
            wants_pooling_engine(_args("smollm2-135m-instruct", task=task))
        with pytest.raises(ModelLoadError, match="decoder models serve --task embed"):
            PoolingEngine.from_args(_args("smollm2-135m-instruct", task=task), warmup=False)
    with pytest.raises(ModelLoadError, match="one device"):
        PoolingEngine.from_args(_args("smollm2-135m-instruct", tensor_parallel_size=2),
                                warmup=False)
