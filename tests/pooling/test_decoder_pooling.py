"""Decoder (Llama-family) embeddings through the one engine: SmolLM2 against transformers,
chunked prompts, the prefix cache, batch invariance, no recompiles, selection and refusals.

- Tiny random Llama and Gemma 3 (``models.testing``; Gemma's sliding window of 24 is shorter
  than the longest input): every sequence of a packed step equals a dense causal forward of that
  sequence alone (``tests.engine.dense``), for the per-token states and LAST / MEAN / CLS, also
  when a small token budget splits prompts over several steps (chunked prefill).
- SmolLM2-135M-Instruct against transformers + torch (``tests/golden/pooling/smollm2_embed.*``
  from ``scripts/make_decoder_embed_golden.py``): normalised last-token embeddings within
  cosine 0.9999 and |delta| <= EMB_ATOL; raw states within STATE_ATOL.
- A sequence alone and inside a batch of 32 of different lengths: identical within 1e-5.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest

from models.pooling import PoolingType
from models.registry import LoadedModel, ModelLoadError
from models.testing import tiny_loaded
from serving.engine.config import EngineArgs
from serving.engine.engine import LLMEngine
from serving.engine.llm import LLM
from serving.engine.pooling_params import PoolingParams
from tests.engine.dense import dense_attention, dense_write
from tests.pooling.conftest import embed, load_golden, steps_of
from tests.utils import single_seq_inputs

# Normalised embeddings (unit vectors, float32) vs transformers: measured max |delta| ~1e-6.
EMB_ATOL = 1e-5
# Raw final hidden states (entries up to ~34 for SmolLM2): measured max |delta| ~5e-5.
STATE_ATOL = 5e-4
# Tiny random models vs the dense forward.
TINY_ATOL = 5e-5
LENGTHS = (1, 5, 17, 40, 33, 2, 16, 9)  # 123 tokens: one step of T = 128


def _tiny_engine(ld: LoadedModel, pooling: PoolingType = PoolingType.LAST,
                 budget: int = 128) -> LLM:
    """A tiny decoder served with --task embed: 8 sequences a step, buckets T in {32, budget};
    raw (unnormalised) pooled vectors."""
    override = json.dumps({"pooling_type": pooling.value, "normalize": False})
    return LLM(loaded=ld, task="embed", max_model_len=64, max_num_seqs=8,
               max_num_batched_tokens=budget, token_buckets=(32,) if budget > 32 else (),
               override_pooler_config=override, compilation_cache=False)


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


def _reference(model_type: str, seq: list[int], pooling: PoolingType) -> np.ndarray:
    want = _dense_states(model_type, seq)
    return {PoolingType.MEAN: want.mean(0), PoolingType.CLS: want[0],
            PoolingType.LAST: want[-1]}[pooling]


# ------------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_packed_step_matches_dense_forward(model_type: str) -> None:
    llm = _tiny_engine(tiny_loaded(model_type))
    seqs = _seqs()
    steps = steps_of(llm)
    pooled = embed(llm, seqs)
    assert steps_of(llm) - steps == 1  # all 8 in one step of T = 128
    hidden = embed(llm, seqs, PoolingParams(task="encode"))
    for seq, p, h in zip(seqs, pooled, hidden, strict=True):
        want = _dense_states(model_type, seq)
        assert h.shape == want.shape == (len(seq), 56)
        np.testing.assert_allclose(h, want, atol=TINY_ATOL, rtol=0)
        np.testing.assert_allclose(p, want[-1], atol=TINY_ATOL, rtol=0)


@pytest.mark.parametrize("pooling", [PoolingType.MEAN, PoolingType.CLS])
def test_mean_and_first_token_pooling(pooling: PoolingType) -> None:
    llm = _tiny_engine(tiny_loaded("llama"), pooling)
    seqs = _seqs(seed=1)
    for seq, p in zip(seqs, embed(llm, seqs), strict=True):
        np.testing.assert_allclose(p, _reference("llama", seq, pooling), atol=TINY_ATOL,
                                   rtol=0)


@pytest.mark.parametrize("pooling", [PoolingType.MEAN, PoolingType.CLS, PoolingType.LAST])
def test_chunked_prompts_pool_like_whole_ones(pooling: PoolingType) -> None:
    """A 16-token budget splits every prompt longer than 16 tokens over several steps; MEAN is
    accumulated across the chunks, CLS kept from the first, LAST taken from the final one, and
    the per-token states are concatenated."""
    llm = _tiny_engine(tiny_loaded("llama"), pooling, budget=16)
    seqs = _seqs((40, 17, 3, 33), seed=2)
    steps = steps_of(llm)
    got = embed(llm, seqs)
    assert steps_of(llm) - steps >= -(-93 // 16)  # 93 tokens, 16 a step: the 40 take 3 steps
    for seq, p in zip(seqs, got, strict=True):
        np.testing.assert_allclose(p, _reference("llama", seq, pooling), atol=TINY_ATOL,
                                   rtol=0)
    for seq, h in zip(seqs, embed(llm, seqs, PoolingParams(task="encode")), strict=True):
        np.testing.assert_allclose(h, _dense_states("llama", seq), atol=TINY_ATOL, rtol=0)
    llm.engine.kv.check()
    assert llm.engine.kv.num_used == 0  # every page back (cached pages are evictable)


def test_last_token_pooling_uses_the_prefix_cache() -> None:
    """LAST pooling needs only the last token's state: a repeated prompt is served from the
    prefix cache (and gives the same vector); MEAN needs every token, so it never hits."""
    seq = _seqs((50,), seed=3)[0]
    last = _tiny_engine(tiny_loaded("llama"), PoolingType.LAST)
    a = embed(last, [seq])[0]
    b = embed(last, [seq])[0]
    assert last.engine.kv.prefix_hits == 48  # three full 16-token pages of the second run
    np.testing.assert_allclose(a, b, atol=TINY_ATOL, rtol=0)
    mean = _tiny_engine(tiny_loaded("llama"), PoolingType.MEAN)
    embed(mean, [seq])
    embed(mean, [seq])
    assert mean.engine.kv.prefix_hits == 0


def test_warmup_compiles_everything_and_the_kv_cache_is_donated_state() -> None:
    llm = _tiny_engine(tiny_loaded("llama"))
    runner = llm.engine.runner
    # One per bucket: a runner that only pools compiles the pooling into its step.
    assert runner.num_executables == len(runner.cfg.token_buckets) == 2
    before = runner.kv[0][0]
    for lengths in ((1,), (64,), (16, 16, 16, 16), LENGTHS, (2,) * 8):
        embed(llm, _seqs(lengths))
        embed(llm, _seqs(lengths), PoolingParams(task="encode"))
    assert runner.num_executables == 2 and runner.num_recompiles == 0
    after = runner.kv[0][0]
    assert after is not before and after.shape == before.shape  # returned, never grown
    assert before.is_deleted()  # donated to the step


# ------------------------------------------------------------------------------- SmolLM2


def test_smollm2_tokenizer_matches_reference(smollm2_embed: LLM) -> None:
    meta, _ = load_golden("smollm2_embed")
    got = [list(x.token_ids) for x in smollm2_embed.processor.tokenize(meta["sentences"])]
    assert got == meta["token_ids"]


def test_smollm2_embeddings_match_transformers(smollm2_embed: LLM) -> None:
    meta, gold = load_golden("smollm2_embed")
    pooler = smollm2_embed.engine.pooler
    assert pooler is not None and pooler.pooling_type == PoolingType.LAST and pooler.normalize
    got = np.stack(embed(smollm2_embed, meta["token_ids"]))
    want = gold["embeddings"]
    assert got.shape == want.shape == (8, 576)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cos = np.sum(got * want, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.9999, (cos.argmin(), cos.min())
    assert np.abs(got - want).max() <= EMB_ATOL
    raw = embed(smollm2_embed, meta["token_ids"], PoolingParams(normalize=False))
    np.testing.assert_allclose(np.stack(raw), gold["last_unnormalized"], atol=STATE_ATOL,
                               rtol=0)


def test_smollm2_per_token_states_and_other_poolers(smollm2_embed: LLM) -> None:
    """``/pooling``'s per-token states; MEAN and first-token (CLS) pooling on the same weights
    (a second engine on the same loaded model, one bucket)."""
    meta, gold = load_golden("smollm2_embed")
    idx = meta["hidden_of"]
    outs = embed(smollm2_embed, [meta["token_ids"][i] for i in idx],
                 PoolingParams(task="encode"))
    for i, out in zip(idx, outs, strict=True):
        assert out.shape == gold[f"hidden_{i}"].shape == (len(meta["token_ids"][i]), 576)
        np.testing.assert_allclose(out, gold[f"hidden_{i}"], atol=STATE_ATOL, rtol=0)
    for pooling, key in ((PoolingType.MEAN, "mean_unnormalized"),
                         (PoolingType.CLS, "first_unnormalized")):
        other = LLM(loaded=smollm2_embed.engine.loaded, task="embed", max_model_len=64,
                    max_num_seqs=8, max_num_batched_tokens=512, token_buckets=(),
                    override_pooler_config=json.dumps({"pooling_type": pooling.value}))
        got = np.stack(embed(other, meta["token_ids"], PoolingParams(normalize=False)))
        assert other.engine.runner.num_executables == 1  # one bucket, pooling in the step
        np.testing.assert_allclose(got, gold[key], atol=STATE_ATOL, rtol=0)


def _others(n: int) -> list[list[int]]:
    """n token-id lists of lengths 2..64, all different from each other where possible."""
    rng = np.random.default_rng(7)
    lengths = [2 + (5 * i) % 63 for i in range(n)]
    return [[int(t) for t in rng.integers(100, 40000, k)] for k in lengths]


def test_smollm2_batch_invariance(smollm2_embed: LLM) -> None:
    meta, _ = load_golden("smollm2_embed")
    target = meta["token_ids"][4]  # "What is the capital of France?"
    steps = steps_of(smollm2_embed)
    (alone,) = embed(smollm2_embed, [target])
    others = _others(31)
    assert len({len(x) for x in others}) == 31
    for pos in (0, 17, 31):
        batch = [*others[:pos], target, *others[pos:]]
        outs = embed(smollm2_embed, batch)
        np.testing.assert_allclose(outs[pos], alone, atol=1e-5, rtol=0)
    # Alone: one step; each batch of 32 (~1000 tokens): one 2048-token step.
    assert steps_of(smollm2_embed) - steps == 4
    st = smollm2_embed.engine.get_stats()
    assert st.num_recompiles == 0
    assert st.num_executables == len(smollm2_embed.engine.runner.cfg.token_buckets) == 3


def test_smollm2_truncation_keeps_the_end(smollm2_embed: LLM) -> None:
    text = "one two three four five six seven"
    full = list(smollm2_embed.processor.tokenize([text])[0].token_ids)
    (cut,) = smollm2_embed.processor.tokenize([text], truncate_prompt_tokens=3)
    assert list(cut.token_ids) == full[-3:]
    a = embed(smollm2_embed, [full], PoolingParams(truncate_prompt_tokens=3))
    b = embed(smollm2_embed, [full[-3:]])
    np.testing.assert_array_equal(a[0], b[0])


# ------------------------------------------------------------------------------- selection


def _args(model: str | None, **kw: Any) -> EngineArgs:
    base: dict[str, Any] = dict(model=model, task="embed", dtype="float32", max_model_len=64,
                                max_num_seqs=2, compilation_cache=False)
    return EngineArgs(**{**base, **kw})


def test_from_args_serves_a_decoder_with_task_embed() -> None:
    engine = LLMEngine(_args(None), warmup=False)  # the default asset
    assert engine.tasks == ("embed", "encode")
    assert engine.loaded.name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    info = engine.facts.pooling
    assert info is not None and info.tasks == ("embed", "encode") and info.hidden_size == 576
    assert engine.max_model_len == 64 and engine.runner.cfg.token_buckets == [16, 32, 64, 128]
    assert engine.pooler is not None and engine.pooler.pooling_type == PoolingType.LAST
    assert engine.pooler.normalize and engine.pooler.source == "default"
    assert engine.tokenizer.truncation_side == "left"
    assert engine.runner.num_executables == 0  # warmup=False
    over = LLMEngine(_args("smollm2-135m-instruct",
                           override_pooler_config='{"pooling_type": "MEAN", "normalize": false}'),
                     warmup=False)
    assert over.pooler is not None and over.pooler.pooling_type == PoolingType.MEAN
    assert not over.pooler.normalize and over.pooler.source == "override"


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
        LLMEngine(_args(str(tmp_path)), warmup=False)


def test_decoder_task_refusals() -> None:
    for task in ("classify", "score"):
        with pytest.raises(ModelLoadError, match="needs a BERT-family cross-encoder"):
            LLMEngine(_args("smollm2-135m-instruct", task=task), warmup=False)
