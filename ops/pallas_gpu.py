"""Ragged paged attention and the KV-cache write as Pallas GPU kernels (Triton lowering).

Same contract as ``ops.attention`` (the pure-jnp reference these kernels are tested against):
``ragged_paged_attention(q, k_cache, v_cache, page_table, kv_lens, cu_q_lens, *, sm_scale,
sliding_window, soft_cap)`` and ``write_kv(k_cache, v_cache, k, v, slot_mapping)``. Why Triton
and not Mosaic GPU, and what JAX 0.11 does with it: see ``ops/README.md``.

Design (one program = one query block of one sequence x one kv head, see ``ops.kernel_common``):
- The program's rows are ``block_q`` tokens x the G query heads that share the kv head (G padded to
  a power of two for Triton), so GQA costs one K/V read per kv head, not per query head.
- It loops over the sequence's keys ``block_kv`` at a time between dynamic bounds taken from the
  metadata: from the sliding-window start of its first token to its last token's position + 1.
- Keys are gathered straight from the pages: page id = ``page_table[seq, key // B]``. Every load
  of the page table, K and V is *masked* by ``lo <= key < hi``; masked lanes are not read, so the
  kernel touches no page outside the sequence's table and no slot at or past its length. There is
  no value-level masking after the load: the load mask is the only bounds check (the NaN-page test
  in ``tests/ops`` fails if it is loosened).
- Online softmax in f32; the output of every row, padding rows included, is written exactly once.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from ops import attention
from ops.kernel_common import (
    MASK_VALUE,
    QBlocks,
    build_q_blocks,
    next_pow2,
    num_q_blocks,
    validate_attention_args,
    validate_write_args,
)

# Pure-jnp references with the same signatures (the semantics these kernels must match).
ragged_paged_attention_reference = attention.ragged_paged_attention_reference
write_kv_reference = attention.write_kv

# Triton's tl.dot needs every operand dimension >= 16.
_MIN_DOT = 16


def _rpa_kernel(
    # Query-block schedule, each i32[NB] (whole arrays: Triton reads scalars from global memory).
    blk_seq_ref: Any,
    blk_tok0_ref: Any,
    blk_rows_ref: Any,
    blk_pos0_ref: Any,
    blk_kv_len_ref: Any,
    page_table_ref: Any,  # i32[S, W]
    q_ref: Any,  # [T, N, H]
    k_cache_ref: Any,  # [K, P, B, H]
    v_cache_ref: Any,  # [K, P, B, H]
    o_ref: Any,  # [T, N, H]
    *,
    group: int,
    group_pad: int,
    block_q: int,
    block_kv: int,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    precision: Any,
) -> None:
    b, kh = pl.program_id(0), pl.program_id(1)
    page = k_cache_ref.shape[2]
    head = q_ref.shape[2]
    m_rows = block_q * group_pad

    seq = blk_seq_ref[b]
    tok0 = blk_tok0_ref[b]
    rows = blk_rows_ref[b]
    pos0 = blk_pos0_ref[b]
    kv_len = blk_kv_len_ref[b]

    # Row r of the tile is token tok0 + r // Gp, query head kh * G + r % Gp.
    r = jnp.arange(m_rows, dtype=jnp.int32)
    r_tok = r // group_pad
    r_grp = r % group_pad
    row_ok = (r_tok < rows) & (r_grp < group)  # [M]
    row_pos = pos0 + r_tok  # [M] absolute position of the row's token
    h = jnp.arange(head, dtype=jnp.int32)[None, :]  # [1, H]
    q_idx = (tok0 + r_tok[:, None], kh * group + r_grp[:, None], h)  # -> [M, H]
    row_mask = jnp.broadcast_to(row_ok[:, None], (m_rows, head))
    q = pltr.load(q_ref.at[q_idx], mask=row_mask, other=0)  # [M, H]

    # Keys this block needs: [lo, hi). hi <= kv_len: the kernel never looks past the length.
    hi = jnp.where(rows > 0, jnp.minimum(kv_len, pos0 + rows), 0)
    if sliding_window is None:
        lo = jnp.int32(0)
        row_lo = jnp.zeros_like(row_pos)
    else:
        lo = jnp.maximum(pos0 - sliding_window + 1, 0)
        row_lo = row_pos - sliding_window + 1

    def body(j: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple:
        acc, m, denom = carry  # [M, H], [M], [M] f32
        kpos = j * block_kv + jnp.arange(block_kv, dtype=jnp.int32)  # [BK]
        k_ok = (kpos >= lo) & (kpos < hi)  # THE bounds check: masked lanes are never read
        pages = pltr.load(page_table_ref.at[seq, kpos // page], mask=k_ok, other=0)  # i32[BK]
        kv_idx = (kh, pages[:, None], (kpos % page)[:, None], h)  # -> [BK, H]
        kv_mask = jnp.broadcast_to(k_ok[:, None], (block_kv, head))
        k = pltr.load(k_cache_ref.at[kv_idx], mask=kv_mask, other=0)  # [BK, H]
        s = pltr.dot(q, k, trans_b=True, precision=precision) * sm_scale  # [M, BK] f32
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        mask = (k_ok[None, :] & row_ok[:, None] & (kpos[None, :] <= row_pos[:, None])
                & (kpos[None, :] >= row_lo[:, None]))
        s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        corr = jnp.exp(m - m_new)
        v = pltr.load(v_cache_ref.at[kv_idx], mask=kv_mask, other=0)  # [BK, H]
        pv = pltr.dot(p.astype(v.dtype), v, precision=precision)  # [M, H] f32
        return acc * corr[:, None] + pv, m_new, denom * corr + jnp.sum(p, axis=1)

    init = (
        jnp.zeros((m_rows, head), jnp.float32),
        jnp.full((m_rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((m_rows,), jnp.float32),
    )
    acc, _, denom = lax.fori_loop(lo // block_kv, (hi + block_kv - 1) // block_kv, body, init)
    out = acc / jnp.where(denom > 0, denom, 1.0)[:, None]  # rows with no keys (padding) are 0
    pltr.store(o_ref.at[q_idx], out.astype(o_ref.dtype), mask=row_mask)


def _pick_block_q(num_tokens: int, num_seqs: int, group_pad: int) -> int:
    """Tokens per query block: small for decode-shaped buckets (1 token per sequence), larger for
    prefill, and always enough rows (block_q * Gp >= 16) for tl.dot."""
    rows = 16 if num_tokens <= num_seqs else 64
    return max(1, rows // group_pad, _MIN_DOT // group_pad)


def ragged_paged_attention_unbatched(
    q: jax.Array,  # [T, N, H]
    k_cache: jax.Array,  # [K, P, B, H]
    v_cache: jax.Array,  # [K, P, B, H]
    page_table: jax.Array,  # i32[S, W]
    blocks: QBlocks,  # i32[NB] each
    *,
    block_q: int,
    block_kv: int,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    num_warps: int,
    num_stages: int,
    interpret: bool,
    out_init: jax.Array | None = None,
) -> jax.Array:
    """Launcher: grid (NB, K) over query blocks x kv heads. Every operand is passed whole (no
    BlockSpecs): Triton programs address global memory through the gathers in the kernel.

    ``out_init`` (tests only) is aliased to the output, so rows the kernel fails to write keep
    its (poisoned) values.
    """
    num_tokens, num_q, head = q.shape
    num_kv = k_cache.shape[0]
    group = num_q // num_kv
    nb = blocks.seq.shape[0]
    kernel = functools.partial(
        _rpa_kernel,
        group=group,
        group_pad=next_pow2(group),
        block_q=block_q,
        block_kv=block_kv,
        sm_scale=float(sm_scale),
        sliding_window=None if sliding_window is None else int(sliding_window),
        soft_cap=None if soft_cap is None else float(soft_cap),
        # f32 caches: exact f32 dots (no TF32) so the f32 tolerance holds on hardware too.
        precision=lax.Precision.HIGHEST if k_cache.dtype == jnp.float32 else None,
    )
    args = [blocks.seq, blocks.tok0, blocks.rows, blocks.pos0, blocks.kv_len, page_table,
            q, k_cache, v_cache]
    aliases = {}
    if out_init is not None:
        aliases = {len(args): 0}
        args.append(out_init)
        kernel = _drop_last_input(kernel)
    return pl.pallas_call(
        kernel,
        grid=(nb, num_kv),
        out_shape=jax.ShapeDtypeStruct((num_tokens, num_q, head), q.dtype),
        input_output_aliases=aliases,
        interpret=interpret,
        compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name=f"ragged_paged_attention_{block_q=}_{block_kv=}",
    )(*args)


def _drop_last_input(kernel: Any) -> Any:
    """Adapt a kernel to an extra (aliased) last input that it must not read."""

    def wrapped(*refs: Any) -> None:
        *ins, _aliased, out = refs
        kernel(*ins, out)

    return wrapped


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "sliding_window", "soft_cap", "block_q", "block_kv",
                     "num_warps", "num_stages", "interpret"),
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
    block_kv: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
    interpret: bool = False,
) -> jax.Array:  # [T, N, H], zeros for padding tokens
    """Ragged paged attention on GPU (Pallas, Triton lowering); semantics of
    ``ops.attention.ragged_paged_attention_reference``.

    Args beyond the reference's: ``block_q`` tokens per query block (default by bucket shape),
    ``block_kv`` keys per inner step (a power of two >= 16; default 64 for H=256, else 128),
    Triton ``num_warps``/``num_stages``, and ``interpret`` to run on CPU.
    Raises ValueError naming the offending argument.
    """
    validate_attention_args(q, k_cache, v_cache, page_table, kv_lens, cu_q_lens,
                            sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    num_tokens, num_q, head = q.shape
    group_pad = next_pow2(num_q // k_cache.shape[0])
    if head < _MIN_DOT or head & (head - 1):
        raise ValueError(f"q head dim must be a power of two >= 16 for Triton, got {head}")
    if block_q is None:
        block_q = _pick_block_q(num_tokens, kv_lens.shape[0], group_pad)
    if block_q < 1 or block_q & (block_q - 1) or block_q * group_pad < _MIN_DOT:
        raise ValueError(f"block_q must be a power of two with block_q * {group_pad} >= "
                         f"{_MIN_DOT}, got {block_q}")
    if block_kv is None:
        block_kv = 64 if head > 128 else 128
    if block_kv < _MIN_DOT or block_kv & (block_kv - 1):
        raise ValueError(f"block_kv must be a power of two >= {_MIN_DOT}, got {block_kv}")
    if num_warps is None:
        num_warps = 4 if block_q * group_pad <= 16 else 8
    blocks = build_q_blocks(cu_q_lens, kv_lens, num_tokens, block_q)
    assert blocks.seq.shape[0] == num_q_blocks(num_tokens, kv_lens.shape[0], block_q)
    return ragged_paged_attention_unbatched(
        q, k_cache, v_cache, page_table, blocks, block_q=block_q, block_kv=block_kv,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
        num_warps=num_warps, num_stages=num_stages, interpret=interpret)


def _write_kv_kernel(
    slot_ref: Any,  # i32[T]
    k_ref: Any,  # [T, K, H]
    v_ref: Any,  # [T, K, H]
    _k_cache_in: Any,  # [K, P, B, H], aliased to k_cache_ref
    _v_cache_in: Any,  # [K, P, B, H], aliased to v_cache_ref
    k_cache_ref: Any,  # [K, P, B, H] out
    v_cache_ref: Any,  # [K, P, B, H] out
    *,
    block_t: int,
) -> None:
    tb, kh = pl.program_id(0), pl.program_id(1)
    num_tokens = k_ref.shape[0]
    _, num_pages, page, head = k_cache_ref.shape
    t = tb * block_t + jnp.arange(block_t, dtype=jnp.int32)  # [BT]
    in_range = t < num_tokens
    slot = pltr.load(slot_ref.at[t], mask=in_range, other=-1)
    ok = in_range & (slot >= 0)  # padding (-1) is dropped: its lanes write nothing
    h = jnp.arange(head, dtype=jnp.int32)[None, :]
    mask = jnp.broadcast_to(ok[:, None], (block_t, head))
    src = (t[:, None], kh, h)
    # Masked lanes point one page past the end: never touched on GPU, dropped in interpret mode.
    pg = jnp.where(ok, slot // page, num_pages)
    dst = (kh, pg[:, None], (slot % page)[:, None], h)
    kv = pltr.load(k_ref.at[src], mask=mask, other=0)
    pltr.store(k_cache_ref.at[dst], kv.astype(k_cache_ref.dtype), mask=mask)
    vv = pltr.load(v_ref.at[src], mask=mask, other=0)
    pltr.store(v_cache_ref.at[dst], vv.astype(v_cache_ref.dtype), mask=mask)


@functools.partial(jax.jit, static_argnames=("block_t", "interpret"),
                   donate_argnames=("k_cache", "v_cache"))
def write_kv(
    k_cache: jax.Array,  # [K, P, B, H]
    v_cache: jax.Array,  # [K, P, B, H]
    k: jax.Array,  # [T, K, H] this step's keys
    v: jax.Array,  # [T, K, H]
    slot_mapping: jax.Array,  # i32[T], -1 for padding
    *,
    block_t: int = 16,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Scatter this step's K/V into their slots in place (the caches are aliased to the outputs
    and donated); semantics of ``ops.attention.write_kv``. Grid (cdiv(T, block_t), K)."""
    validate_write_args(k_cache, v_cache, k, v, slot_mapping)
    if block_t < 1 or block_t & (block_t - 1):
        raise ValueError(f"block_t must be a power of two, got {block_t}")
    num_tokens, num_kv, head = k.shape
    if head & (head - 1):
        raise ValueError(f"k head dim must be a power of two for Triton, got {head}")
    k_out, v_out = pl.pallas_call(
        functools.partial(_write_kv_kernel, block_t=block_t),
        grid=(pl.cdiv(num_tokens, block_t), num_kv),
        out_shape=(jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                   jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)),
        input_output_aliases={3: 0, 4: 1},
        interpret=interpret,
        compiler_params=pltr.CompilerParams(num_warps=4, num_stages=1),
        name=f"write_kv_{block_t=}",
    )(slot_mapping, k, v, k_cache, v_cache)
    return k_out, v_out
