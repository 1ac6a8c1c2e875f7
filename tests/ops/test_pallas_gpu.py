"""The GPU (Triton-lowered) Pallas kernels against the pure-jnp reference.

Default run: interpret mode on CPU over a covering set of configurations (every GQA ratio x
dtype, every head dim, every page size, window / soft cap, non-default blocks), each config
checked on all-decode, all-prefill and mixed ragged batches with NaN in every unused slot.
``-m slow``: the full product. ``-m gpu``: the same cases compiled for a real GPU, plus a
Llama-3-8B-shaped batch.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ops import attention, pallas_gpu
from ops.kernel_common import build_q_blocks, next_pow2
from tests.ops.paged_cases import (
    SCENARIOS,
    Case,
    Geometry,
    assert_matches_reference,
    build_case,
)

F32, BF16 = jnp.float32, jnp.bfloat16
NUM_KV = 2

# (group, head, page, dtype, sliding_window, soft_cap, block_q, block_kv)
DEFAULT_CONFIGS = [
    (1, 128, 16, F32, None, None, None, None),
    (3, 128, 16, F32, None, None, None, None),
    (3, 128, 16, BF16, None, None, None, None),
    (8, 128, 16, BF16, None, None, None, None),
    (4, 64, 32, BF16, None, None, None, None),
    (4, 256, 64, F32, None, None, None, None),
    (2, 128, 128, BF16, None, None, None, None),
    (4, 128, 16, BF16, 7, None, None, None),
    (4, 128, 16, F32, None, 5.0, None, None),
    (3, 64, 32, BF16, 32, 20.0, None, None),
    (4, 128, 16, F32, None, None, 4, 16),
]
SLOW_CONFIGS = [
    (g, h, b, dt, w, c, None, None)
    for g, h, b, dt, (w, c) in itertools.product(
        (1, 3, 8), (64, 128, 256), (16, 32, 64, 128), (F32, BF16),
        ((None, None), (16, None), (None, 30.0), (100, 10.0)))
]


def _label(cfg: tuple) -> str:
    g, h, b, dt, w, c, bq, bkv = cfg
    return (f"G{g}-H{h}-B{b}-{jnp.dtype(dt).name}-win{w}-cap{c}"
            + (f"-bq{bq}-bkv{bkv}" if bq else ""))


def _check_config(cfg: tuple, *, interpret: bool, seed: int = 0) -> None:
    g, h, b, dt, w, c, bq, bkv = cfg
    geo = Geometry.fitting(SCENARIOS, num_kv=NUM_KV, group=g, head=h, page=b, dtype=dt)
    attn_kw = dict(sm_scale=h ** -0.5, sliding_window=w, soft_cap=c)
    for i, (name, seqs) in enumerate(SCENARIOS.items()):
        case = build_case(geo, seqs, seed=seed + i)
        ref = attention.ragged_paged_attention_reference(*case.args, **attn_kw)
        out = pallas_gpu.ragged_paged_attention(*case.args, **attn_kw, block_q=bq, block_kv=bkv,
                                                interpret=interpret)
        assert_matches_reference(out, ref, case, f"{_label(cfg)} {name}")


@pytest.mark.parametrize("cfg", DEFAULT_CONFIGS, ids=_label)
def test_kernel_matches_reference_interpret(cfg: tuple) -> None:
    _check_config(cfg, interpret=True)


@pytest.mark.slow
@pytest.mark.parametrize("cfg", SLOW_CONFIGS, ids=_label)
def test_kernel_matches_reference_interpret_full_product(cfg: tuple) -> None:
    _check_config(cfg, interpret=True, seed=7)


def _launch_poisoned(case: Case, *, block_q: int, block_kv: int,
                     **attn_kw: object) -> jax.Array:
    """Call the launcher with a NaN-filled output buffer aliased to its output."""
    blocks = build_q_blocks(case.cu_q_lens, case.kv_lens, case.q.shape[0], block_q)
    poison = jnp.full(case.q.shape, jnp.nan, case.q.dtype)
    return pallas_gpu.ragged_paged_attention_unbatched(
        case.q, case.k_cache, case.v_cache, case.page_table, blocks, block_q=block_q,
        block_kv=block_kv, num_warps=4, num_stages=2, interpret=True, out_init=poison,
        **attn_kw)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_output_row_written_and_table_padding_never_read(scenario: str) -> None:
    """Poisoned output + page-table padding pointing far outside the cache: every row must be
    overwritten, and no entry past a sequence's pages may be dereferenced."""
    geo = Geometry.fitting(SCENARIOS, num_kv=NUM_KV, group=3, head=64, page=16, dtype=F32)
    case = build_case(geo, SCENARIOS[scenario], seed=3, oob_table=True)
    attn_kw = dict(sm_scale=0.125, sliding_window=None, soft_cap=None)
    ref = attention.ragged_paged_attention_reference(*case.args, **attn_kw)
    out = _launch_poisoned(case, block_q=8, block_kv=32, **attn_kw)
    assert_matches_reference(out, ref, case, f"poisoned {scenario}")


def test_poison_is_detected() -> None:
    """Self-check of the poisoning: a launch whose grid skips the last query blocks leaves NaN."""
    geo = Geometry.fitting(SCENARIOS, num_kv=NUM_KV, group=2, head=64, page=16, dtype=F32)
    case = build_case(geo, SCENARIOS["mixed"])
    blocks = build_q_blocks(case.cu_q_lens, case.kv_lens, case.q.shape[0], 8)
    truncated = jax.tree.map(lambda a: a[:2], blocks)  # only the first two blocks
    out = pallas_gpu.ragged_paged_attention_unbatched(
        case.q, case.k_cache, case.v_cache, case.page_table, truncated, block_q=8,
        block_kv=32, num_warps=4, num_stages=2, interpret=True, sm_scale=0.1,
        sliding_window=None, soft_cap=None,
        out_init=jnp.full(case.q.shape, jnp.nan, case.q.dtype))
    assert np.isnan(np.asarray(out)).any()


def _base_args() -> tuple[jax.Array, ...]:
    geo = Geometry.fitting(SCENARIOS, num_kv=2, group=2, head=64, page=16, dtype=F32)
    return build_case(geo, SCENARIOS["mixed"]).args


@pytest.mark.parametrize("mutate, kwargs, match", [
    (lambda a: (a[0][0], *a[1:]), {}, "q must be"),
    (lambda a: (a[0], a[1][0], *a[2:]), {}, "k_cache must be"),
    (lambda a: (a[0], a[1], a[2].astype(BF16), *a[3:]), {}, "v_cache must match"),
    (lambda a: (a[0][:, :3], *a[1:]), {}, "not a multiple of"),
    (lambda a: (a[0][..., :32], *a[1:]), {}, "head dim"),
    (lambda a: (*a[:3], a[3].astype(jnp.int16), *a[4:]), {}, "page_table must be"),
    (lambda a: (*a[:4], a[4][:-1], a[5]), {}, "kv_lens must be"),
    (lambda a: (*a[:5], a[5][:-1]), {}, "cu_q_lens must be"),
    (lambda a: a, {"sm_scale": -1.0}, "sm_scale"),
    (lambda a: a, {"sliding_window": 0}, "sliding_window"),
    (lambda a: a, {"soft_cap": 0.0}, "soft_cap"),
    (lambda a: a, {"block_q": 3}, "block_q"),
    (lambda a: a, {"block_kv": 8}, "block_kv"),
    (lambda a: (a[0][..., :48], a[1][..., :48], a[2][..., :48], *a[3:]), {}, "power of two"),
])
def test_validation_errors_name_the_argument(mutate, kwargs, match) -> None:
    kw = {"sm_scale": 0.1, "interpret": True, **kwargs}
    with pytest.raises(ValueError, match=match):
        pallas_gpu.ragged_paged_attention(*mutate(_base_args()), **kw)


def _write_case(dtype: object, seed: int = 0) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(seed)
    k, p, b, h, t = 3, 11, 16, 64, 37
    k_cache = jnp.asarray(rng.standard_normal((k, p, b, h)), dtype)
    v_cache = jnp.asarray(rng.standard_normal((k, p, b, h)), dtype)
    new_k = jnp.asarray(rng.standard_normal((t, k, h)), jnp.float32)  # cast by the write
    new_v = jnp.asarray(rng.standard_normal((t, k, h)), jnp.float32)
    slots = rng.permutation(np.arange(b, p * b))[:t].astype(np.int32)  # never the null page
    slots[[0, 5, 36]] = -1
    return k_cache, v_cache, new_k, new_v, jnp.asarray(slots)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["float32", "bfloat16"])
def test_write_kv_exact(dtype: object) -> None:
    k_cache, v_cache, new_k, new_v, slots = _write_case(dtype)
    ref_k, ref_v = attention.write_kv(k_cache, v_cache, new_k, new_v, slots)
    # The kernel donates its caches: hand it copies.
    out_k, out_v = pallas_gpu.write_kv(jnp.array(k_cache), jnp.array(v_cache), new_k, new_v,
                                       slots, interpret=True)
    assert out_k.dtype == dtype and out_v.dtype == dtype
    np.testing.assert_array_equal(np.asarray(out_k, np.float32), np.asarray(ref_k, np.float32))
    np.testing.assert_array_equal(np.asarray(out_v, np.float32), np.asarray(ref_v, np.float32))


def test_write_kv_validation() -> None:
    k_cache, v_cache, new_k, new_v, slots = _write_case(F32)
    with pytest.raises(ValueError, match="slot_mapping"):
        pallas_gpu.write_kv(k_cache, v_cache, new_k, new_v, slots[:-1], interpret=True)
    with pytest.raises(ValueError, match="k must be"):
        pallas_gpu.write_kv(k_cache, v_cache, new_k[:, :2], new_v, slots, interpret=True)
    with pytest.raises(ValueError, match="v_cache must match"):
        pallas_gpu.write_kv(k_cache, v_cache[:2], new_k, new_v, slots, interpret=True)


def test_kernels_lower_to_triton_for_cuda() -> None:
    """Lowering (Pallas -> Triton IR) for a CUDA target runs on CPU: it proves every op of the
    kernel has a Triton lowering rule. Compiling that IR to PTX needs the GPU run."""
    q = jax.ShapeDtypeStruct((64, 6, 64), BF16)
    cache = jax.ShapeDtypeStruct((2, 40, 16, 64), BF16)
    i32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.int32)
    lowered = pallas_gpu.ragged_paged_attention.trace(
        q, cache, cache, i32((8, 12)), i32((8,)), i32((9,)), sm_scale=0.125,
        sliding_window=32, soft_cap=30.0).lower(lowering_platforms=("cuda",))
    assert "triton" in lowered.as_text()
    kv = jax.ShapeDtypeStruct((64, 2, 64), BF16)
    lowered = pallas_gpu.write_kv.trace(cache, cache, kv, kv, i32((64,))).lower(
        lowering_platforms=("cuda",))
    assert "triton" in lowered.as_text()


def test_group_padding_is_a_power_of_two() -> None:
    assert [next_pow2(g) for g in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]


# ---------------------------------------------------------------- real GPU (-m gpu) ----------

needs_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("cfg", DEFAULT_CONFIGS, ids=_label)
def test_kernel_matches_reference_on_gpu(cfg: tuple) -> None:
    _check_config(cfg, interpret=False)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_output_row_written_on_gpu(scenario: str) -> None:
    geo = Geometry.fitting(SCENARIOS, num_kv=NUM_KV, group=4, head=128, page=16, dtype=BF16)
    case = build_case(geo, SCENARIOS[scenario], seed=5)
    blocks = build_q_blocks(case.cu_q_lens, case.kv_lens, case.q.shape[0], 4)
    attn_kw = dict(sm_scale=0.1, sliding_window=None, soft_cap=None)
    out = pallas_gpu.ragged_paged_attention_unbatched(
        case.q, case.k_cache, case.v_cache, case.page_table, blocks, block_q=4, block_kv=64,
        num_warps=4, num_stages=2, interpret=False,
        out_init=jnp.full(case.q.shape, jnp.nan, case.q.dtype), **attn_kw)
    ref = attention.ragged_paged_attention_reference(*case.args, **attn_kw)
    assert_matches_reference(out, ref, case, f"gpu poisoned {scenario}")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["float32", "bfloat16"])
def test_write_kv_exact_on_gpu(dtype: object) -> None:
    k_cache, v_cache, new_k, new_v, slots = _write_case(dtype, seed=1)
    ref_k, ref_v = attention.write_kv(k_cache, v_cache, new_k, new_v, slots)
    out_k, out_v = pallas_gpu.write_kv(jnp.array(k_cache), jnp.array(v_cache), new_k, new_v,
                                       slots)
    np.testing.assert_array_equal(np.asarray(out_k, np.float32), np.asarray(ref_k, np.float32))
    np.testing.assert_array_equal(np.asarray(out_v, np.float32), np.asarray(ref_v, np.float32))


@pytest.mark.gpu
@needs_gpu
def test_llama3_8b_shape_on_gpu() -> None:
    """32 q heads, 8 kv heads, head dim 128, bf16, page 16: 48 decode sequences at 1-4k context
    plus 4 prefill chunks of 256, vs the reference."""
    rng = np.random.default_rng(0)
    seqs = [(1, int(n)) for n in rng.integers(1, 4096, 48)] + [(256, 256 + 512 * i)
                                                              for i in range(4)]
    scen = {"mixed": seqs}
    geo = Geometry.fitting(scen, num_kv=8, group=4, head=128, page=16, dtype=BF16)
    case = build_case(geo, seqs)
    attn_kw = dict(sm_scale=128 ** -0.5, sliding_window=None, soft_cap=None)
    ref = attention.ragged_paged_attention_reference(*case.args, **attn_kw)
    out = pallas_gpu.ragged_paged_attention(*case.args, **attn_kw)
    assert_matches_reference(out, ref, case, "llama3-8b shape")
