"""The native CPU kernels (``ops.native``) against the reference, both ISA builds this CPU runs
(the AVX2 build everywhere, the AVX-512 one where the CPU has it), and the backend switch's
fallback when they cannot be had.

Kernels: the packed GEMM against numpy over every row remainder of the micro-tile, odd panel and
K counts, f32 and f16 weights; the paged attention over the adversarial cases of
``tests.ops.paged_cases`` (NaN outside the sequences' slots, shuffled and out-of-range page
tables, NaN padding queries), with sliding window and soft cap, over f32 and f16 caches (the
reference reading the same f16 cache). Engine: greedy tokens of the
tiny models on the native backend (every token bucket, chunked prefill mixed with decode) equal
the reference backend's; the real SmolLM2 is in the slow suite.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.layers import Attention, Embedding, GatedMLP, pack_linears
from models.registry import LoadedModel
from models.testing import tiny_loaded
from ops import attention, backend, native
from serving.engine.llm import LLM
from serving.engine.sampling_params import SamplingParams
from tests.models.test_golden import golden
from tests.ops.native_host import native_available
from tests.ops.paged_cases import SCENARIOS, Geometry, assert_matches_reference, build_case

# Skipped only on a host that cannot build them (not x86-64 Linux, no AVX2, no compiler); on
# every other host a failed build fails here.
pytestmark = pytest.mark.skipif(not native_available(),
                                reason="this host cannot build the native CPU kernels")

BUILDS = native.runnable_isas()


@pytest.fixture(params=BUILDS)
def kernels(request: pytest.FixtureRequest) -> native.NativeKernels:
    return native.load(request.param)


# (M, K, N): every row count of a 6-row micro-tile and its remainders, N of an odd number of
# 16-column panels (the AVX-512 tile is two panels wide), K not a multiple of the k unroll, and
# M > 6 with K > 128 (the K-blocked path); a tall x (prefill, encoders): several row blocks
# with a ragged last one, the 4-panel AVX-512 tile with 2- and 1-panel tails (N = 7 panels),
# several panel groups (N = 25 panels, 16 to a group of 256 rows; with 2 threads the 9 row blocks
# take every panel each) with a ragged last one.
SHAPES = [(1, 37, 16), (2, 64, 48), (3, 129, 80), (4, 5, 32), (5, 300, 16), (6, 576, 960),
          (7, 257, 112), (13, 600, 48), (32, 576, 576), (33, 130, 208), (520, 200, 112),
          (1000, 40, 64), (2053, 140, 400)]


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_linear_matches_numpy(kernels: native.NativeKernels, dtype: str) -> None:
    rng = np.random.default_rng(0)
    fn = jax.jit(kernels.linear)
    for m, k, n in SHAPES:
        x = rng.standard_normal((m, k)).astype(np.float32)
        w = rng.standard_normal((k, n)).astype(np.float32)
        packed = native.pack_linear(jnp.asarray(w), native.WEIGHT_DTYPES[dtype])
        assert packed.shape == (n // 16, k, 16)
        # The reference is the product with the weights as stored (f16-rounded for f16).
        want = x.astype(np.float64) @ np.asarray(packed.astype(jnp.float32)).transpose(
            1, 0, 2).reshape(k, n).astype(np.float64)
        got = np.asarray(fn(jnp.asarray(x), packed))
        np.testing.assert_allclose(got, want, atol=1e-4 * np.sqrt(k), rtol=1e-5,
                                   err_msg=f"{kernels.isa} {dtype} M={m} K={k} N={n}")


def test_packing_round_trips() -> None:
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((40, 48)), jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(native.pack_linear(w)).transpose(1, 0, 2).reshape(40, 48), np.asarray(w))
    table = jnp.asarray(rng.standard_normal((48, 40)), jnp.float32)  # [N, K]
    ids = jnp.asarray([0, 47, 16, 5, 5])
    np.testing.assert_array_equal(np.asarray(native.packed_rows(native.pack_rows(table), ids)),
                                  np.asarray(table)[np.asarray(ids)])
    with pytest.raises(ValueError, match="multiple of 16"):
        native.pack_linear(jnp.zeros((4, 40)))
    assert not native.packable(jnp.zeros((4, 40))) and native.packable(jnp.zeros((4, 48)))


@pytest.mark.parametrize("window, soft_cap", [(None, None), (40, None), (None, 30.0)])
@pytest.mark.parametrize("oob_table", [False, True])
@pytest.mark.parametrize("group, head", [(3, 64), (1, 16)])
@pytest.mark.parametrize("kv_dtype", [jnp.float32, jnp.float16], ids=["kv_f32", "kv_f16"])
def test_attention_matches_reference(kernels: native.NativeKernels, window: int | None,
                                     soft_cap: float | None, oob_table: bool, group: int,
                                     head: int, kv_dtype: object) -> None:
    """f32 q over an f32 or f16 cache (NaN-filled unused slots stay NaN in f16); the reference
    reads the same cache values, so the f32 tolerance holds for both."""
    geo = Geometry.fitting(SCENARIOS, num_kv=2, group=group, head=head, page=16,
                           dtype=jnp.float32)
    kw = dict(sm_scale=head ** -0.5, sliding_window=window, soft_cap=soft_cap)
    fn = jax.jit(lambda *a: kernels.ragged_paged_attention(*a, **kw))
    for name, seqs in SCENARIOS.items():  # one compiled shape for all: lengths are data
        case = build_case(geo, seqs, seed=len(name), oob_table=oob_table)
        k_cache = attention.keys_dim_major(case.k_cache).astype(kv_dtype)
        args = (case.q, k_cache, case.v_cache.astype(kv_dtype), *case.args[3:])
        ref = attention.ragged_paged_attention_reference(*args, **kw, dim_major_keys=True)
        assert "custom_call" in fn.lower(*args).as_text()  # the kernel, not the fallback
        assert_matches_reference(fn(*args), ref, case, f"{kernels.isa} {name}")


@pytest.mark.parametrize("dtype, group", [(jnp.bfloat16, 2), (jnp.float32, native.MAX_GROUP + 1)])
def test_attention_outside_the_kernel_is_the_reference(dtype: object, group: int) -> None:
    """The kernel reads f32 or f16 caches with at most MAX_GROUP query heads per kv head;
    bf16 caches or a larger group take the reference path, bit for bit (no custom call in the
    program)."""
    geo = Geometry.fitting(SCENARIOS, num_kv=1, group=group, head=32, page=16, dtype=dtype)
    case = build_case(geo, SCENARIOS["mixed"], seed=2)
    args = (case.q, attention.keys_dim_major(case.k_cache), *case.args[2:])
    kernels = native.kernels()
    assert kernels is not None
    fn = jax.jit(lambda *a: kernels.ragged_paged_attention(*a, sm_scale=0.2))
    assert "custom_call" not in fn.lower(*args).as_text()
    ref = attention.ragged_paged_attention_reference(*args, sm_scale=0.2, dim_major_keys=True)
    np.testing.assert_array_equal(np.asarray(fn(*args), np.float32), np.asarray(ref, np.float32))


def top_k_rows(rng: np.random.Generator, v: int) -> np.ndarray:
    """Rows that order adversarially: ties (runs of equal values), -0.0 against 0.0, -inf
    (half a row, and a whole row), NaN of both signs beside +-inf, ascending and descending
    values (the threshold scan's worst and best order)."""
    x = rng.standard_normal((8, v)).astype(np.float32)
    x[1] = np.round(x[1], 1)
    x[2] = 0.0
    x[2, ::3] = -0.0
    x[3, rng.integers(0, v, v // 2)] = -np.inf
    x[4] = -np.inf
    x[5, :5] = [np.nan, -np.nan, np.inf, -np.inf, 0.0]
    x[6] = np.arange(v, dtype=np.float32)
    x[7] = -np.arange(v, dtype=np.float32)
    return x


@pytest.mark.parametrize("v", [128, 200, 257, 1003, 49152])
def test_top_k_is_lax_top_k_bit_for_bit(kernels: native.NativeKernels, v: int) -> None:
    """The sampler's candidates: the same values (as bits) and indices, in the same order, as
    ``lax.top_k`` gives, for every k up to the row length."""
    x = jnp.asarray(top_k_rows(np.random.default_rng(v), v))
    for k in sorted({1, 5, min(128, v), v}):
        want = jax.jit(lambda x, k=k: jax.lax.top_k(x, k))(x)
        got = jax.jit(lambda x, k=k: kernels.top_k(x, k))(x)
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]), err_msg=f"k={k}")
        np.testing.assert_array_equal(np.asarray(got[0]).view(np.int32),
                                      np.asarray(want[0]).view(np.int32), err_msg=f"k={k}")


def test_auto_is_native_on_cpu_and_native_pairs_the_cpu_write() -> None:
    attn, write, desc = backend.get_attention_fn("auto")
    host = native.kernels()
    assert host is not None and attn == host.ragged_paged_attention
    assert write.func is attention.write_kv  # type: ignore[attr-defined]
    assert write.keywords == {"dim_major_keys": True}  # type: ignore[attr-defined]
    assert "native" in desc and host.isa in desc
    linear = backend.get_linear_fn("auto", "f16")
    assert linear is not None and "f16" in linear.description
    with pytest.raises(ValueError, match="weight dtype"):
        backend.get_linear_fn("native", "bf16")
    with pytest.raises(ValueError, match="runs on a CPU"):
        backend.get_attention_fn("native", platform="gpu")
    assert backend.get_linear_fn("auto", platform="gpu") is None


def test_without_kernels_auto_falls_back_to_the_reference(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        tmp_path: object) -> None:
    """No compiler (or ``XLASERVE_CPU_ISA=none``): one warning, the reference path, and an
    explicit ``native`` request is an error naming why."""
    monkeypatch.setenv("XLASERVE_CACHE_DIR", str(tmp_path))  # no cached library to fall back on
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    native.kernels.cache_clear()
    native.load.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="xlaserve.ops"):
            attn, _, desc = backend.get_attention_fn("auto")
            backend.get_attention_fn("auto")
        assert attn.func is attention.ragged_paged_attention_reference  # type: ignore[attr-defined]
        assert "reference" in desc
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "no C++ compiler" in warnings[0], warnings
        assert backend.get_linear_fn("auto") is None
        with pytest.raises(ValueError, match="no C\\+\\+ compiler"):
            backend.get_attention_fn("native")
        monkeypatch.delenv("CXX")
        monkeypatch.setenv("XLASERVE_CPU_ISA", "none")
        native.kernels.cache_clear()
        native.load.cache_clear()
        assert native.kernels() is None
    finally:
        native.kernels.cache_clear()
        native.load.cache_clear()


# ---- the engine on the native backend ---------------------------------------------------------

ENGINE = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=16, block_size=16,
              compilation_cache=False)
# Dimensions the packing takes (outputs in whole 16-column panels); gemma3 keeps a 259-token
# vocabulary, so its LM head and embedding stay on the einsum path beside packed layers.
TINY = {"llama": dict(head_dim=16, hidden_size=48, intermediate_size=80, vocab_size=272),
        "gemma3_text": dict(head_dim=16, hidden_size=48, intermediate_size=80,
                            query_pre_attn_scalar=16.0)}


def _prompts() -> list[list[int]]:
    rng = random.Random(5)
    return [[rng.randrange(256) for _ in range(n)] for n in (3, 45, 17, 70, 9, 31)]


def _native_llm(family: str, weight_dtype: str, **kw: object) -> LLM:
    attn, write, _ = backend.get_attention_fn("native")
    loaded = tiny_loaded(family, attn_fn=attn, write_fn=write, **TINY[family])
    linear = backend.get_linear_fn("native", weight_dtype)
    assert linear is not None
    packed = pack_linears(loaded.model, linear)
    # 3 layers x (attention + MLP), plus the tied embedding where the vocabulary packs.
    assert packed == (7 if family == "llama" else 6)
    return LLM(loaded=loaded, **ENGINE, **kw)


def _greedy(llm: LLM) -> list[list[int]]:
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    return [r.outputs[0].token_ids for r in llm.generate(_prompts(), greedy, use_tqdm=False)]


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_engine_on_native_kernels_matches_reference_path(family: str) -> None:
    attn, write, _ = backend.get_attention_fn("reference")
    want = _greedy(LLM(loaded=tiny_loaded(family, attn_fn=attn, write_fn=write,
                                          **TINY[family]), **ENGINE))
    llm = _native_llm(family, "f32")
    assert _greedy(llm) == want
    runner = llm.engine.runner
    assert runner.num_recompiles == 0
    for t in runner.cfg.token_buckets:  # the kernels are in every compiled step
        hlo = runner.step_hlo(t)
        assert hlo.count(f"xlaserve_{native.kernels().isa}_paged_attention") == 3, t  # type: ignore[union-attr]
        assert f"xlaserve_{native.kernels().isa}_linear_f32" in hlo, t  # type: ignore[union-attr]


def test_engine_with_f16_kv_cache_on_native_kernels() -> None:
    """``--kv-cache-dtype float16`` on the native backend: the cache is f16, every compiled step
    calls the kernel's f16 target, and the greedy tokens equal (1) the reference backend's on
    the same f16 cache and (2) the native backend's with the f32 cache, the chosen tokens'
    logprobs within 1e-2 of the f32 cache's (f16 rounds K and V to 11 significant bits; measured
    on this model: the same tokens for every prompt)."""
    logprobs = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0)

    def run(llm: LLM) -> tuple[list[list[int]], list[list[float]]]:
        outs = [r.outputs[0] for r in llm.generate(_prompts(), logprobs, use_tqdm=False)]
        return ([o.token_ids for o in outs],
                [[lp.logprob for lp in o.logprobs or []] for o in outs])

    attn, write, _ = backend.get_attention_fn("reference")
    ref_f16 = run(LLM(loaded=tiny_loaded("llama", attn_fn=attn, write_fn=write,
                                         **TINY["llama"]), kv_cache_dtype="float16", **ENGINE))
    native_f32 = run(_native_llm("llama", "f32"))
    llm = _native_llm("llama", "f32", kv_cache_dtype="float16")
    native_f16 = run(llm)
    assert native_f16[0] == ref_f16[0]
    assert native_f16[0] == native_f32[0]
    assert sum(map(len, native_f16[1])) == len(_prompts()) * 12
    np.testing.assert_allclose(np.concatenate(native_f16[1]), np.concatenate(native_f32[1]),
                               atol=1e-2)
    runner = llm.engine.runner
    assert all(c.dtype == jnp.float16 for layer in runner.kv for c in layer)
    assert runner.num_recompiles == 0
    isa = native.kernels().isa  # type: ignore[union-attr]
    for t in runner.cfg.token_buckets:
        assert runner.step_hlo(t).count(f"xlaserve_{isa}_paged_attention_f16") == 3, t


@pytest.mark.slow
@pytest.mark.parametrize("weight_dtype", ["f32", "f16"])
def test_smollm2_greedy_on_native_kernels_matches_reference(weight_dtype: str) -> None:
    """The real model, as ``serve`` loads it: ``auto`` on CPU (native kernels, the weights
    packed at load) against ``--attention-backend reference``: the same 48 greedy tokens per
    prompt, for f16 weights too (measured: identical over 5 prompts x 64 tokens)."""
    prompts = ["The capital of France is", "def fibonacci(n):", "Write a haiku about the sea.",
               "List three colors:"]
    greedy = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    kw = dict(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=32,
              token_buckets=(1, 4, 32), compilation_cache=False)
    out = {}
    for be in ("reference", "auto"):
        llm = LLM(attention_backend=be, cpu_weight_dtype=weight_dtype, **kw)
        out[be] = [r.outputs[0].token_ids for r in llm.generate(prompts, greedy,
                                                                use_tqdm=False)]
        assert llm.engine.runner.num_recompiles == 0
        if be == "auto":
            assert "linear_" + ("f16" if weight_dtype == "f16" else "f32") in \
                llm.engine.runner.step_hlo(4)
    assert out["auto"] == out["reference"]


# ---- Q8_0 weights (weight-only int8) ----------------------------------------------------------

# (M, K, N) for the Q8_0 GEMM: M = 1 and 2 (the fused decode tiles), 3..6 and more (the
# dequantized-slab path, every row remainder of the 6-row tile), K not a multiple of the 32-row
# block nor of the k unroll, K over the 128/256-row K block, N of an odd number of panels.
Q8_SHAPES = [(1, 37, 16), (1, 576, 960), (2, 64, 48), (2, 33, 80), (3, 129, 80), (4, 5, 32),
             (5, 300, 16), (6, 576, 48), (7, 257, 112), (13, 600, 48), (32, 576, 576),
             (33, 130, 208)]


def _q8_reference(x: np.ndarray, packed: jax.Array, k: int) -> np.ndarray:
    """The product with the weights the packing encodes, in f64."""
    return x.astype(np.float64) @ np.asarray(native.unpack_q8(packed, k)).astype(np.float64)


def test_linear_q8_matches_dequantized_weights(kernels: native.NativeKernels) -> None:
    rng = np.random.default_rng(3)
    fn = jax.jit(kernels.linear)
    for m, k, n in Q8_SHAPES:
        x = rng.standard_normal((m, k)).astype(np.float32)
        # Columns of very different magnitudes: each (block, column) needs its own scale.
        w = (rng.standard_normal((k, n)) * rng.uniform(0.01, 10.0, (1, n))).astype(np.float32)
        packed = native.pack_linear_q8(jnp.asarray(w))
        assert packed.shape == (n // 16, -(-k // 32), native.Q8_BLOCK) and packed.dtype == jnp.int8
        got = np.asarray(fn(jnp.asarray(x), packed))
        want = _q8_reference(x, packed, k)
        scale = np.abs(want).max()
        np.testing.assert_allclose(got, want, atol=2e-6 * np.sqrt(k) * scale, rtol=1e-5,
                                   err_msg=f"{kernels.isa} q8_0 M={m} K={k} N={n}")


def test_q8_packing_bounds_and_rows() -> None:
    """Each weight is within half its block's step of the original; an all-zero block stays
    zero; ``packed_rows_q8`` reads the same values as ``unpack_q8`` for any ids."""
    rng = np.random.default_rng(4)
    k, n = 70, 48
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[32:64, 5] = 0.0  # one all-zero (block, column)
    w[3, 7] = 1e4  # one outlier: its column's first block gets a coarse step, the others not
    packed = native.pack_linear_q8(jnp.asarray(w))
    deq = np.asarray(native.unpack_q8(packed, k))
    for b in range(0, k, 32):
        block = w[b:b + 32]
        step = np.abs(block).max(axis=0) / 127.0
        assert np.all(np.abs(deq[b:b + 32] - block) <= step / 2 * (1 + 1e-6) + 1e-12), b
    assert np.all(deq[32:64, 5] == 0.0)
    assert np.abs(deq[40:, 7] - w[40:, 7]).max() < 0.02
    table = rng.standard_normal((n, k)).astype(np.float32)  # [N, K], a tied embedding
    rows_packed = native.pack_rows_q8(jnp.asarray(table))
    ids = jnp.asarray([0, 47, 16, 5, 5, 31])
    got = np.asarray(native.packed_rows_q8(rows_packed, ids))
    assert got.shape == (6, 96) and np.all(got[:, k:] == 0.0)
    np.testing.assert_array_equal(
        got[:, :k], np.asarray(native.unpack_q8(rows_packed, k)).T[np.asarray(ids)])


def _dequantized_like_q8(loaded: LoadedModel[Any]) -> None:
    """Replace, in place, every weight ``pack_linears`` would pack by what its Q8_0 packing
    encodes (the reference model for the native Q8_0 engine)."""
    def round_trip(w: jax.Array) -> jax.Array:  # [K, N]
        return native.unpack_q8(native.pack_linear_q8(w), w.shape[0])

    for _, m in nnx.iter_graph(loaded.model):
        if isinstance(m, Attention):
            for p in (m.qkv, m.o):
                w = p[...]
                flat = w.reshape(w.shape[0], -1) if p is m.qkv else w.reshape(-1, w.shape[-1])
                p.set_value(round_trip(flat).reshape(w.shape))
        elif isinstance(m, GatedMLP):
            gu = m.gate_up[...]
            m.gate_up.set_value(round_trip(gu.reshape(gu.shape[0], -1)).reshape(gu.shape))
            m.down.set_value(round_trip(m.down[...]))
        elif isinstance(m, Embedding) and native.packable(m.weight[...].T):
            m.weight.set_value(round_trip(m.weight[...].T).T)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_engine_on_q8_weights_matches_dequantized_reference(family: str) -> None:
    """The engine with ``q8_0`` weights: the same greedy tokens as the reference backend on
    the dequantized weights, no recompile, the Q8_0 GEMM in every compiled step. The tiny
    llama's hidden size (48) is not a multiple of the 32-row block (the padded last block, and
    the embedding rows read back out of it)."""
    attn, write, _ = backend.get_attention_fn("reference")
    ref = tiny_loaded(family, attn_fn=attn, write_fn=write, **TINY[family])
    _dequantized_like_q8(ref)
    want = _greedy(LLM(loaded=ref, **ENGINE))
    llm = _native_llm(family, "q8_0")
    assert _greedy(llm) == want
    runner = llm.engine.runner
    assert runner.num_recompiles == 0
    for t in runner.cfg.token_buckets:
        assert f"xlaserve_{native.kernels().isa}_linear_q8" in runner.step_hlo(t), t  # type: ignore[union-attr]


@pytest.mark.slow
@pytest.mark.parametrize("weight_dtype", ["f32", "f16"])
def test_smollm2_greedy_with_f16_kv_cache_matches_golden(weight_dtype: str) -> None:
    """``--kv-cache-dtype float16`` on the real model as ``serve`` loads it (``auto``: native
    kernels): the 32 greedy tokens of every golden prompt equal transformers' f32 reference
    (``tests/golden/smollm2.*``), as the f32 cache's do. Measured beside the f32 cache: the same
    tokens, chosen-token logprobs within 0.0042 (f32 weights) and 0.0027 (f16 weights)."""
    meta, arr = golden("smollm2")
    prompts = [arr[f"p{i}_prompt_ids"].tolist() for i in range(len(meta["prompts"]))]
    llm = LLM(kv_cache_dtype="float16", cpu_weight_dtype=weight_dtype, max_model_len=1024,
              max_num_seqs=4, max_num_batched_tokens=256, token_buckets=(1, 4, 256),
              compilation_cache=False)
    greedy = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True,
                            skip_special_tokens=False)
    for i, res in enumerate(llm.generate(prompts, greedy, use_tqdm=False)):
        assert res.outputs[0].token_ids == arr[f"p{i}_greedy_ids"].tolist(), f"prompt {i}"
    runner = llm.engine.runner
    assert runner.num_recompiles == 0
    assert all(c.dtype == jnp.float16 for layer in runner.kv for c in layer)
    assert "paged_attention_f16" in runner.step_hlo(4)
