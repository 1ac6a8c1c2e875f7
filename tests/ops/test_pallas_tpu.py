"""The TPU (Mosaic) Pallas kernels against the pure-jnp reference, in TPU interpret mode on CPU.

TPU interpret mode (``pltpu.InterpretParams``) simulates HBM, VMEM, SMEM, the DMA engine and
semaphores; it raises on any out-of-bounds read and fills fresh buffers (VMEM scratch, outputs)
with NaN. It compiles slowly (seconds per configuration), so the default set is small and uses
few pages per DMA step; ``-m slow`` runs a larger product, ``-m tpu`` runs compiled on a TPU.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from ops import attention, pallas_tpu
from ops.kernel_common import build_q_blocks
from tests.ops.paged_cases import SCENARIOS, Geometry, assert_matches_reference, build_case

F32, BF16 = jnp.float32, jnp.bfloat16
NUM_KV = 2

# (group, head, page, dtype, sliding_window, soft_cap, block_q, pages_per_block)
DEFAULT_CONFIGS = [
    (4, 128, 16, BF16, None, None, None, 2),
    (3, 128, 32, F32, None, None, None, 2),
    (8, 256, 16, BF16, 16, None, None, 4),
    (1, 64, 16, F32, None, 10.0, None, 3),
    (4, 128, 128, BF16, 24, 30.0, 2, 1),
    (2, 128, 64, BF16, None, None, None, None),  # default pages_per_block
]
SLOW_CONFIGS = [
    (g, h, b, dt, w, c, None, 2)
    for g, h, b, dt, (w, c) in itertools.product(
        (1, 3, 8), (64, 128, 256), (16, 64, 128), (F32, BF16), ((None, None), (50, 20.0)))
]


def _label(cfg: tuple) -> str:
    g, h, b, dt, w, c, bq, ppb = cfg
    return f"G{g}-H{h}-B{b}-{jnp.dtype(dt).name}-win{w}-cap{c}-bq{bq}-ppb{ppb}"


@pytest.fixture(autouse=True)
def _fresh_interpreter() -> None:
    # A kernel that raised inside TPU interpret mode leaves its simulated memory behind.
    pltpu.reset_tpu_interpret_mode_state()


def _check_config(cfg: tuple, *, interpret: bool, seed: int = 0) -> None:
    g, h, b, dt, w, c, bq, ppb = cfg
    geo = Geometry.fitting(SCENARIOS, num_kv=NUM_KV, group=g, head=h, page=b, dtype=dt)
    attn_kw = dict(sm_scale=h ** -0.5, sliding_window=w, soft_cap=c)
    for i, (name, seqs) in enumerate(SCENARIOS.items()):
        # Page-table padding points outside the cache: a DMA of it raises in interpret mode.
        case = build_case(geo, seqs, seed=seed + i, oob_table=True)
        ref = attention.ragged_paged_attention_reference(*case.args, **attn_kw)
        out = pallas_tpu.ragged_paged_attention(*case.args, **attn_kw, block_q=bq,
                                                pages_per_block=ppb, interpret=interpret)
        assert_matches_reference(out, ref, case, f"{_label(cfg)} {name}")


@pytest.mark.parametrize("cfg", DEFAULT_CONFIGS, ids=_label)
def test_kernel_matches_reference_interpret(cfg: tuple) -> None:
    _check_config(cfg, interpret=True)


@pytest.mark.slow
@pytest.mark.parametrize("cfg", SLOW_CONFIGS, ids=_label)
def test_kernel_matches_reference_interpret_full_product(cfg: tuple) -> None:
    _check_config(cfg, interpret=True, seed=11)


def test_every_packed_row_written_and_no_dma_races() -> None:
    """Poison the packed output (aliased), run with the race detector and two simulated cores
    (the grid is "parallel"): every packed row, padding rows included, must be overwritten,
    and no DMA may race with the compute reading its buffer."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret

    geo = Geometry.fitting(SCENARIOS, num_kv=NUM_KV, group=3, head=128, page=16, dtype=F32)
    case = build_case(geo, SCENARIOS["mixed"], seed=2, oob_table=True)
    group, block_q = 3, 4
    num_tokens = case.q.shape[0]
    blocks = build_q_blocks(case.cu_q_lens, case.kv_lens, num_tokens, block_q)
    q_blocks, row_tok = pallas_tpu.pack_queries(case.q, blocks, block_q=block_q, group=group)
    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    out_blocks = pallas_tpu.ragged_paged_attention_unbatched(
        q_blocks, row_tok, case.k_cache, case.v_cache, case.page_table, blocks,
        pages_per_block=2, sm_scale=0.1, sliding_window=None, soft_cap=None, interpret=params,
        out_init=jnp.full(q_blocks.shape, jnp.nan, q_blocks.dtype))
    assert not np.isnan(np.asarray(out_blocks)).any(), "a packed output row was not written"
    assert not tpu_interpret.races.races_found
    out = pallas_tpu.unpack_outputs(out_blocks, case.cu_q_lens, case.kv_lens,
                                    num_tokens=num_tokens, block_q=block_q, group=group)
    ref = attention.ragged_paged_attention_reference(*case.args, sm_scale=0.1)
    assert_matches_reference(out, ref, case, "poisoned, race-checked")


def _base_args() -> tuple[jax.Array, ...]:
    geo = Geometry.fitting(SCENARIOS, num_kv=2, group=2, head=128, page=16, dtype=F32)
    return build_case(geo, SCENARIOS["mixed"]).args


@pytest.mark.parametrize("mutate, kwargs, match", [
    (lambda a: (a[0][0], *a[1:]), {}, "q must be"),
    (lambda a: (a[0][:, :3], *a[1:]), {}, "not a multiple of"),
    (lambda a: (*a[:4], a[4].astype(jnp.int16), a[5]), {}, "kv_lens must be"),
    (lambda a: (a[0], a[1][:, :, :12], a[2][:, :, :12], *a[3:]), {}, "page size"),
    (lambda a: a, {"sliding_window": -4}, "sliding_window"),
    (lambda a: a, {"block_q": 0}, "block_q"),
    (lambda a: a, {"pages_per_block": 0}, "pages_per_block"),
])
def test_validation_errors_name_the_argument(mutate, kwargs, match) -> None:
    kw = {"sm_scale": 0.1, "interpret": True, **kwargs}
    with pytest.raises(ValueError, match=match):
        pallas_tpu.ragged_paged_attention(*mutate(_base_args()), **kw)


def _write_case(dtype: object, seed: int = 0) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(seed)
    k, p, b, h, t = 2, 9, 16, 128, 29
    k_cache = jnp.asarray(rng.standard_normal((k, p, b, h)), dtype)
    v_cache = jnp.asarray(rng.standard_normal((k, p, b, h)), dtype)
    new_k = jnp.asarray(rng.standard_normal((t, k, h)), jnp.float32)
    new_v = jnp.asarray(rng.standard_normal((t, k, h)), jnp.float32)
    slots = rng.permutation(np.arange(b, p * b))[:t].astype(np.int32)
    slots[[1, 2, 28]] = -1
    return k_cache, v_cache, new_k, new_v, jnp.asarray(slots)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["float32", "bfloat16"])
def test_write_kv_exact(dtype: object) -> None:
    k_cache, v_cache, new_k, new_v, slots = _write_case(dtype)
    ref_k, ref_v = attention.write_kv(k_cache, v_cache, new_k, new_v, slots)
    out_k, out_v = pallas_tpu.write_kv(jnp.array(k_cache), jnp.array(v_cache), new_k, new_v,
                                       slots, interpret=True)
    assert out_k.dtype == dtype and out_v.dtype == dtype
    np.testing.assert_array_equal(np.asarray(out_k, np.float32), np.asarray(ref_k, np.float32))
    np.testing.assert_array_equal(np.asarray(out_v, np.float32), np.asarray(ref_v, np.float32))


def test_write_kv_validation() -> None:
    k_cache, v_cache, new_k, new_v, slots = _write_case(F32)
    with pytest.raises(ValueError, match="slot_mapping"):
        pallas_tpu.write_kv(k_cache, v_cache, new_k, new_v, slots.astype(jnp.int16),
                            interpret=True)
    with pytest.raises(ValueError, match="v must have"):
        pallas_tpu.write_kv(k_cache, v_cache, new_k, new_v[:3], slots, interpret=True)


@pytest.mark.parametrize("head", [128, 64])
def test_kernels_lower_to_mosaic_for_tpu(head: int) -> None:
    """Lowering (Pallas -> Mosaic MLIR) for a TPU v5e target runs on CPU under an abstract
    mesh: it proves the block shapes and every kernel op are accepted by the Pallas TPU
    lowering. Mosaic's own compilation (layouts, VMEM fit) needs the TPU run."""
    device = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    q = jax.ShapeDtypeStruct((64, 6, head), BF16)
    cache = jax.ShapeDtypeStruct((2, 40, 16, head), BF16)
    i32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.int32)
    with jax.sharding.use_abstract_mesh(mesh):
        lowered = pallas_tpu.ragged_paged_attention.trace(
            q, cache, cache, i32((8, 12)), i32((8,)), i32((9,)), sm_scale=0.125,
            sliding_window=32, soft_cap=30.0).lower(lowering_platforms=("tpu",))
        assert "tpu_custom_call" in lowered.as_text()
        kv = jax.ShapeDtypeStruct((64, 2, head), BF16)
        lowered = pallas_tpu.write_kv.trace(cache, cache, kv, kv, i32((64,))).lower(
            lowering_platforms=("tpu",))
        assert "tpu_custom_call" in lowered.as_text()


# ---------------------------------------------------------------- real TPU (-m tpu) ----------

needs_tpu = pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")


@pytest.mark.tpu
@needs_tpu
@pytest.mark.parametrize("cfg", DEFAULT_CONFIGS, ids=_label)
def test_kernel_matches_reference_on_tpu(cfg: tuple) -> None:
    _check_config(cfg, interpret=False)


@pytest.mark.tpu
@needs_tpu
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["float32", "bfloat16"])
def test_write_kv_exact_on_tpu(dtype: object) -> None:
    k_cache, v_cache, new_k, new_v, slots = _write_case(dtype, seed=1)
    ref_k, ref_v = attention.write_kv(k_cache, v_cache, new_k, new_v, slots)
    out_k, out_v = pallas_tpu.write_kv(jnp.array(k_cache), jnp.array(v_cache), new_k, new_v,
                                       slots)
    np.testing.assert_array_equal(np.asarray(out_k, np.float32), np.asarray(ref_k, np.float32))
    np.testing.assert_array_equal(np.asarray(out_v, np.float32), np.asarray(ref_v, np.float32))
