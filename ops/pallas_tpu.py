"""Ragged paged attention and the KV-cache write as Pallas TPU (Mosaic) kernels.

Same contract as ``ops.attention`` (the pure-jnp reference these kernels are tested against):
``ragged_paged_attention(q, k_cache, v_cache, page_table, kv_lens, cu_q_lens, *, sm_scale,
sliding_window, soft_cap)`` and ``write_kv(k_cache, v_cache, k, v, slot_mapping)``.

Design (one program = one query block of one sequence x one kv head, see ``ops.kernel_common``):
- The query-block schedule and the flattened page table are *scalar-prefetched* into SMEM, so
  every program knows its sequence, rows, positions and pages before its body runs.
- Query rows are packed outside the kernel into ``[NB, K, Mp, H]`` (row r of block b = token
  ``tok0[b] + r // G``, query head ``k * G + r % G``; Mp = block_q * G rounded up to 8 sublanes)
  so q and out move through ordinary pipelined BlockSpecs; the output is unpacked with a gather.
- K/V stay in HBM (``memory_space=ANY``). The program walks the sequence's pages
  ``pages_per_block`` at a time, double-buffering page DMAs HBM -> VMEM. Only pages that hold
  keys in ``[lo, hi)`` are copied (lo = sliding-window start of the block's first token, hi = its
  last token's position + 1 <= kv_len): pages past the length or outside the table are never
  DMA'd. Slots in a copied page past the length (and buffer slots of skipped pages) are masked
  out of the scores and zeroed in V before the value product, so garbage cannot leak.
- Online softmax in f32; every packed row is written (zeros for padding rows).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ops import attention
from ops.kernel_common import (
    MASK_VALUE,
    QBlocks,
    build_q_blocks,
    token_rows,
    validate_attention_args,
    validate_write_args,
)

# Pure-jnp references with the same signatures (the semantics these kernels must match).
ragged_paged_attention_reference = attention.ragged_paged_attention_reference
write_kv_reference = attention.write_kv

_SUBLANES = 8


def _interpret_params(interpret: bool | pltpu.InterpretParams) -> Any:
    """``True`` -> default TPU interpret mode, which simulates HBM/VMEM/SMEM, DMAs and semaphores
    on CPU, raises on any out-of-bounds read and fills fresh buffers with NaN. An
    ``InterpretParams`` (e.g. with ``detect_races=True``) is passed through."""
    if isinstance(interpret, pltpu.InterpretParams):
        return interpret
    return pltpu.InterpretParams() if interpret else False


def _div(a: jax.Array, b: int) -> jax.Array:
    """``a // b`` for ``a >= 0``, ``b > 0`` inside a kernel, as a truncating ``lax.div``.

    Why not ``//``: ``jnp.floor_divide`` on integers corrects truncation with ``lax.sign``, and
    Pallas' Mosaic lowering rule for ``sign`` reads ``tpu_info.get_tpu_info()`` (bf16 support by
    chip generation), which raises ``Unsupported TPU device kind: cpu`` when the lowering runs on
    a host without a TPU (cross-platform export in CI). With non-negative operands truncation is
    floor, so nothing is lost, and the kernel no longer depends on the local chip.
    """
    return lax.div(a, jnp.int32(b))


def _start_pair(ck: Any, cv: Any) -> None:
    ck.start()
    cv.start()


def _wait_pair(ck: Any, cv: Any) -> None:
    ck.wait()
    cv.wait()


def _rpa_kernel(
    # Scalar prefetch (SMEM).
    blk_seq_ref: Any,  # i32[NB]
    blk_rows_ref: Any,  # i32[NB]
    blk_pos0_ref: Any,  # i32[NB]
    blk_kv_len_ref: Any,  # i32[NB]
    page_table_ref: Any,  # i32[S * W], row-major page table
    # Inputs.
    row_tok_ref: Any,  # VMEM i32[Mp, 1]: token offset of each packed row; block_q for pad rows
    q_ref: Any,  # VMEM [Mp, H]: this block's packed query rows for kv head kh
    k_hbm: Any,  # HBM [K, P, B, H]
    v_hbm: Any,  # HBM [K, P, B, H]
    # Output.
    o_ref: Any,  # VMEM [Mp, H]
    # Scratch.
    k_buf: Any,  # VMEM [2, pages_per_block, B, H]
    v_buf: Any,  # VMEM [2, pages_per_block, B, H]
    sems: Any,  # DMA semaphores [2, 2]: (buffer slot, K/V)
    *,
    width: int,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    precision: Any,
) -> None:
    b, kh = pl.program_id(0), pl.program_id(1)
    _, ppb, page, head = k_buf.shape
    block_kv = ppb * page
    m_rows = q_ref.shape[0]

    seq = blk_seq_ref[b]
    rows = blk_rows_ref[b]
    pos0 = blk_pos0_ref[b]
    kv_len = blk_kv_len_ref[b]
    hi = jnp.where(rows > 0, jnp.minimum(kv_len, pos0 + rows), 0)  # keys needed: [lo, hi)
    lo = jnp.int32(0) if sliding_window is None else jnp.maximum(pos0 - sliding_window + 1, 0)
    # lax.div, not //: every operand is >= 0 (truncation = floor), and jnp's floor division
    # lowers through lax.sign, whose Mosaic rule asks for the local chip (see _div).
    page_lo = _div(lo, page)
    page_hi = _div(hi + page - 1, page)  # pages [page_lo, page_hi) of the sequence hold the keys
    j_lo = _div(page_lo, ppb)
    j_hi = _div(page_hi + ppb - 1, ppb)

    row_tok = row_tok_ref[...]  # [Mp, 1]
    row_ok = row_tok < rows
    row_pos = pos0 + row_tok
    row_lo = (jnp.zeros_like(row_pos) if sliding_window is None
              else row_pos - sliding_window + 1)
    q = q_ref[...]  # [Mp, H]

    def page_copies(j: jax.Array, slot: jax.Array) -> list[tuple[jax.Array, Any, Any]]:
        copies = []
        for i in range(ppb):
            p = j * ppb + i
            needed = (p >= page_lo) & (p < page_hi)
            # Clamped so the SMEM read stays in the row; the copy itself only runs if needed.
            page_id = page_table_ref[seq * width + jnp.minimum(p, width - 1)]
            ck = pltpu.make_async_copy(k_hbm.at[kh, page_id], k_buf.at[slot, i], sems.at[slot, 0])
            cv = pltpu.make_async_copy(v_hbm.at[kh, page_id], v_buf.at[slot, i], sems.at[slot, 1])
            copies.append((needed, ck, cv))
        return copies

    def start(j: jax.Array, slot: jax.Array) -> None:
        for needed, ck, cv in page_copies(j, slot):
            pl.when(needed)(functools.partial(_start_pair, ck, cv))

    def wait(j: jax.Array, slot: jax.Array) -> None:
        for needed, ck, cv in page_copies(j, slot):
            pl.when(needed)(functools.partial(_wait_pair, ck, cv))

    pl.when(j_lo < j_hi)(lambda: start(j_lo, jnp.int32(0)))

    def body(j: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple:
        m, denom, acc = carry  # [Mp, 1], [Mp, 1], [Mp, H] f32
        slot = lax.rem(j - j_lo, 2)  # j >= j_lo
        pl.when(j + 1 < j_hi)(lambda: start(j + 1, 1 - slot))  # prefetch the next block
        wait(j, slot)
        k = k_buf[slot].reshape(block_kv, head)  # [BK, H]
        v = v_buf[slot].reshape(block_kv, head)
        kpos = j * block_kv + lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)  # [1, BK]
        k_ok = (kpos >= lo) & (kpos < hi)
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32) * sm_scale  # [Mp, BK]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        mask = k_ok & row_ok & (kpos <= row_pos) & (kpos >= row_lo)  # [Mp, BK]
        s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        corr = jnp.exp(m - m_new)
        # Slots past the length (or of pages not copied) hold garbage: zero them, since 0 * NaN
        # would otherwise poison the value product.
        kcol = j * block_kv + lax.broadcasted_iota(jnp.int32, (block_kv, 1), 0)  # [BK, 1]
        v = jnp.where((kcol >= lo) & (kcol < hi), v, jnp.zeros_like(v))
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             precision=precision, preferred_element_type=jnp.float32)
        return m_new, denom * corr + jnp.sum(p, axis=1, keepdims=True), acc * corr + pv

    init = (
        jnp.full((m_rows, 1), MASK_VALUE, jnp.float32),
        jnp.zeros((m_rows, 1), jnp.float32),
        jnp.zeros((m_rows, head), jnp.float32),
    )
    _, denom, acc = lax.fori_loop(j_lo, j_hi, body, init)
    o_ref[...] = (acc / jnp.where(denom > 0, denom, 1.0)).astype(o_ref.dtype)


def ragged_paged_attention_unbatched(
    q_blocks: jax.Array,  # [NB, K, Mp, H] packed query rows
    row_tok: jax.Array,  # i32[Mp, 1]
    k_cache: jax.Array,  # [K, P, B, H]
    v_cache: jax.Array,  # [K, P, B, H]
    page_table: jax.Array,  # i32[S, W]
    blocks: QBlocks,  # i32[NB] each
    *,
    pages_per_block: int,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    interpret: bool | pltpu.InterpretParams,
    out_init: jax.Array | None = None,
) -> jax.Array:  # [NB, K, Mp, H]
    """Launcher: grid (NB, K) with 5 scalar-prefetched arrays. ``out_init`` (tests only) is
    aliased to the output so that unwritten rows keep its poisoned values."""
    nb, num_kv, m_rows, head = q_blocks.shape
    _, _, page, _ = k_cache.shape
    kernel = functools.partial(
        _rpa_kernel,
        width=page_table.shape[1],
        sm_scale=float(sm_scale),
        sliding_window=None if sliding_window is None else int(sliding_window),
        soft_cap=None if soft_cap is None else float(soft_cap),
        precision=lax.Precision.HIGHEST if k_cache.dtype == jnp.float32 else None,
    )
    block = pl.BlockSpec((None, None, m_rows, head), lambda b, k, *_: (b, k, 0, 0))
    in_specs = [
        pl.BlockSpec((m_rows, 1), lambda b, k, *_: (0, 0)),
        block,
        pl.BlockSpec(memory_space=pl.ANY),
        pl.BlockSpec(memory_space=pl.ANY),
    ]
    args = [row_tok, q_blocks, k_cache, v_cache]
    aliases = {}
    if out_init is not None:
        in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
        args.append(out_init)
        aliases = {5 + len(args) - 1: 0}  # operand index counts the 5 scalar-prefetch arrays
        kernel = _drop_aliased_input(kernel)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(nb, num_kv),
        in_specs=in_specs,
        out_specs=block,
        scratch_shapes=[
            pltpu.VMEM((2, pages_per_block, page, head), k_cache.dtype),
            pltpu.VMEM((2, pages_per_block, page, head), v_cache.dtype),
            pltpu.SemaphoreType.DMA((2, 2)),
        ],
    )
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(q_blocks.shape, q_blocks.dtype),
        input_output_aliases=aliases,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=_interpret_params(interpret),
        name=f"ragged_paged_attention_ppb{pages_per_block}",
    )(blocks.seq, blocks.rows, blocks.pos0, blocks.kv_len, page_table.reshape(-1), *args)


def _drop_aliased_input(kernel: Any) -> Any:
    """Adapt the kernel to an extra aliased input (after v_hbm) that it must not read."""

    def wrapped(*refs: Any) -> None:
        refs_l = list(refs)
        del refs_l[9]  # 5 scalar refs + row_tok, q, k_hbm, v_hbm come first
        kernel(*refs_l)

    return wrapped


def _pick_block_q(num_tokens: int, num_seqs: int, group: int) -> int:
    """Tokens per query block: about 8 packed rows for decode-shaped buckets, about 128 rows for
    prefill (the MXU wants tall tiles, decode wants few wasted rows)."""
    rows = _SUBLANES if num_tokens <= num_seqs else 128
    return max(1, rows // group)


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "sliding_window", "soft_cap", "block_q", "pages_per_block",
                     "interpret"),
)
def ragged_paged_attention(
    q: jax.Array,  # [T, N, H]
    k_cache: jax.Array,  # [K, P, B, H], already holding this step's keys
    v_cache: jax.Array,  # [K, P, B, H]
    page_table: jax.Array,  # i32[S, W]
    kv_lens: jax.Array,  # i32[S]
    cu_q_lens: jax.Array,  # i32[S + 1]
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    block_q: int | None = None,
    pages_per_block: int | None = None,
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:  # [T, N, H], zeros for padding tokens
    """Ragged paged attention on TPU (Pallas Mosaic); semantics of
    ``ops.attention.ragged_paged_attention_reference``.

    Args beyond the reference's: ``block_q`` tokens per query block (default by bucket shape),
    ``pages_per_block`` pages per DMA step (default: 256 keys' worth), ``interpret`` (True or
    ``pltpu.InterpretParams``) to run in TPU interpret mode on CPU.
    Raises ValueError naming the offending argument.
    """
    validate_attention_args(q, k_cache, v_cache, page_table, kv_lens, cu_q_lens,
                            sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    num_tokens, num_q, _ = q.shape
    num_kv, _, page, _ = k_cache.shape
    group = num_q // num_kv
    if page % _SUBLANES:
        raise ValueError(f"k_cache page size must be a multiple of {_SUBLANES}, got {page}")
    if block_q is None:
        block_q = _pick_block_q(num_tokens, kv_lens.shape[0], group)
    if block_q < 1:
        raise ValueError(f"block_q must be >= 1, got {block_q}")
    if pages_per_block is None:
        pages_per_block = max(1, 256 // page)
    if pages_per_block < 1:
        raise ValueError(f"pages_per_block must be >= 1, got {pages_per_block}")

    blocks = build_q_blocks(cu_q_lens, kv_lens, num_tokens, block_q)
    q_blocks, row_tok = pack_queries(q, blocks, block_q=block_q, group=group)
    out_blocks = ragged_paged_attention_unbatched(
        q_blocks, row_tok, k_cache, v_cache, page_table, blocks,
        pages_per_block=pages_per_block, sm_scale=sm_scale, sliding_window=sliding_window,
        soft_cap=soft_cap, interpret=interpret)
    return unpack_outputs(out_blocks, cu_q_lens, kv_lens, num_tokens=num_tokens,
                          block_q=block_q, group=group)


def pack_queries(
    q: jax.Array,  # [T, N, H]
    blocks: QBlocks,
    *,
    block_q: int,
    group: int,
) -> tuple[jax.Array, jax.Array]:  # [NB, K, Mp, H], i32[Mp, 1]
    """q_blocks[b, k, r] = q[tok0[b] + r // G, k * G + r % G]; rows past ``rows[b]`` (and the
    sublane padding rows, whose token offset is ``block_q``) hold clamped junk the kernel masks.
    Also returns each packed row's token offset ``r // G``."""
    num_tokens, num_q, _ = q.shape
    num_kv = num_q // group
    m_rows = -(-block_q * group // _SUBLANES) * _SUBLANES
    r = np.arange(m_rows)
    row_tok = np.where(r < block_q * group, r // group, block_q).astype(np.int32)
    tok = jnp.minimum(blocks.tok0[:, None] + row_tok[None, :], num_tokens - 1)  # [NB, Mp]
    heads = np.arange(num_kv)[:, None] * group + (r % group)[None, :]  # [K, Mp]
    return q[tok[:, None, :], heads[None, :, :]], jnp.asarray(row_tok[:, None])


def unpack_outputs(
    out_blocks: jax.Array,  # [NB, K, Mp, H]
    cu_q_lens: jax.Array,  # i32[S + 1]
    kv_lens: jax.Array,  # i32[S]
    *,
    num_tokens: int,
    block_q: int,
    group: int,
) -> jax.Array:  # [T, N, H]
    """out[t, n] = out_blocks[block(t), n // G, row(t) * G + n % G] (inverse of the packing)."""
    num_q = out_blocks.shape[1] * group
    blk, row = token_rows(cu_q_lens, kv_lens, num_tokens, block_q)  # i32[T] each
    n = np.arange(num_q)
    return out_blocks[blk[:, None], (n // group)[None, :],
                      row[:, None] * group + (n % group)[None, :]]


def _write_kv_kernel(
    slot_ref: Any,  # SMEM i32[T] (scalar prefetch)
    k_hbm: Any,  # HBM [T, K, H]
    v_hbm: Any,  # HBM [T, K, H]
    _k_cache_in: Any,  # HBM [K, P, B, H], aliased to k_cache_hbm
    _v_cache_in: Any,  # HBM [K, P, B, H], aliased to v_cache_hbm
    k_cache_hbm: Any,  # HBM [K, P, B, H] out
    v_cache_hbm: Any,  # HBM [K, P, B, H] out
    sems: Any,  # DMA semaphores [2]
) -> None:
    num_tokens = k_hbm.shape[0]
    page = k_cache_hbm.shape[2]

    def copies(t: jax.Array) -> tuple[Any, Any]:
        slot = jnp.maximum(slot_ref[t], 0)
        pg, off = _div(slot, page), lax.rem(slot, page)  # slot >= 0
        # One strided DMA per token and cache: [K, H] -> the K slabs of that slot.
        ck = pltpu.make_async_copy(k_hbm.at[t], k_cache_hbm.at[:, pg, off], sems.at[0])
        cv = pltpu.make_async_copy(v_hbm.at[t], v_cache_hbm.at[:, pg, off], sems.at[1])
        return ck, cv

    def issue(t: jax.Array, carry: None) -> None:
        pl.when(slot_ref[t] >= 0)(lambda: _start_pair(*copies(t)))  # padding (-1) is dropped

    def drain(t: jax.Array, carry: None) -> None:
        pl.when(slot_ref[t] >= 0)(lambda: _wait_pair(*copies(t)))

    lax.fori_loop(0, num_tokens, issue, None)
    lax.fori_loop(0, num_tokens, drain, None)


@functools.partial(jax.jit, static_argnames=("interpret",),
                   donate_argnames=("k_cache", "v_cache"))
def write_kv(
    k_cache: jax.Array,  # [K, P, B, H]
    v_cache: jax.Array,  # [K, P, B, H]
    k: jax.Array,  # [T, K, H] this step's keys
    v: jax.Array,  # [T, K, H]
    slot_mapping: jax.Array,  # i32[T], -1 for padding
    *,
    interpret: bool | pltpu.InterpretParams = False,
) -> tuple[jax.Array, jax.Array]:
    """Scatter this step's K/V into their slots in place with one HBM->HBM DMA per token (the
    caches are aliased to the outputs and donated); semantics of ``ops.attention.write_kv``.
    Real slots are distinct (the allocator's invariant), so the DMAs never overlap."""
    validate_write_args(k_cache, v_cache, k, v, slot_mapping)
    k = k.astype(k_cache.dtype)
    v = v.astype(v_cache.dtype)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(1,),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY)] * 4,
        out_specs=[pl.BlockSpec(memory_space=pl.ANY)] * 2,
        scratch_shapes=[pltpu.SemaphoreType.DMA((2,))],
    )
    k_out, v_out = pl.pallas_call(
        _write_kv_kernel,
        grid_spec=grid_spec,
        out_shape=(jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                   jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)),
        input_output_aliases={3: 0, 4: 1},  # operand indices include the scalar prefetch
        interpret=_interpret_params(interpret),
        name="write_kv",
    )(slot_mapping, k, v, k_cache, v_cache)
    return k_out, v_out
