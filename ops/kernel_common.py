"""Pieces shared by the Pallas attention kernels: input validation and the query-block schedule.

Who calls: ``ops.pallas_gpu`` and ``ops.pallas_tpu`` (their public functions validate with
``validate_attention_args`` / ``validate_write_args`` and their launchers build the schedule with
``build_q_blocks``). Axis letters as in ``ops.attention``: T tokens, S sequences, W page-table
width, P pages, B page size, K kv heads, N q heads (N = K * G), H head dim, NB query blocks.

The schedule. A kernel program works on one *query block*: up to ``block_q`` consecutive tokens of
ONE sequence (so every row of the block shares a page table and a KV length) for one kv head.
Sequences are cut into blocks independently, and the padding tokens past ``cu_q_lens[S]`` form one
extra segment whose blocks attend to nothing and write zeros, so every output row has exactly one
owner block. The number of blocks is data; the grid is sized by its static bound ``NB``:
``sum_s ceil(q_s / block_q) <= (T + (S + 1) * (block_q - 1)) // block_q``. Blocks past the real
count have ``rows == 0`` and do nothing.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

# Finite "minus infinity" for masked scores: exp(MASK - m) underflows to 0 and, unlike -inf,
# MASK - MASK is 0, not NaN, when a whole row is masked in a block.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QBlocks:
    """Per query block metadata, every field i32[NB]."""

    seq: jax.Array  # sequence index (clamped into [0, S) for the padding segment: never read)
    tok0: jax.Array  # first token of the block in q / out
    rows: jax.Array  # tokens in the block, 0 for blocks past the real count
    pos0: jax.Array  # absolute position of the block's first token (kv_len - q_len + offset)
    kv_len: jax.Array  # the sequence's kv length; 0 for the padding segment and unused blocks


def num_q_blocks(num_tokens: int, num_seqs: int, block_q: int) -> int:
    """Static upper bound NB on the number of query blocks (see the module docstring)."""
    return max(1, (num_tokens + (num_seqs + 1) * (block_q - 1)) // block_q)


def _segments(
    cu_q_lens: jax.Array, kv_lens: jax.Array, num_tokens: int, block_q: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per segment (S sequences, then the padding tail [cu_q_lens[S], T)), each i32[S + 1]:
    length, first token, kv length, block count, index of the segment's first block."""
    num_seqs = kv_lens.shape[0]
    n_real = cu_q_lens[num_seqs]
    seg_len = jnp.concatenate([cu_q_lens[1:] - cu_q_lens[:-1], (num_tokens - n_real)[None]])
    seg_start = jnp.concatenate([cu_q_lens[:-1], n_real[None]])
    seg_kv = jnp.concatenate([kv_lens, jnp.zeros((1,), jnp.int32)])
    seg_blocks = (seg_len + block_q - 1) // block_q
    seg_first = jnp.cumsum(seg_blocks) - seg_blocks
    return seg_len, seg_start, seg_kv, seg_blocks, seg_first


def build_q_blocks(
    cu_q_lens: jax.Array,  # i32[S + 1]
    kv_lens: jax.Array,  # i32[S]
    num_tokens: int,
    block_q: int,
) -> QBlocks:
    """Cut every sequence's tokens (and the padding tail) into blocks of at most ``block_q``."""
    num_seqs = kv_lens.shape[0]
    nb = num_q_blocks(num_tokens, num_seqs, block_q)
    seg_len, seg_start, seg_kv, seg_blocks, seg_first = _segments(
        cu_q_lens, kv_lens, num_tokens, block_q)
    b = jnp.arange(nb, dtype=jnp.int32)
    # Segment of block b: the last segment whose first block is <= b (empty segments share
    # their first block with the next one, and "side=right" skips past them).
    seg = jnp.searchsorted(seg_first + seg_blocks, b, side="right").astype(jnp.int32)
    used = seg <= num_seqs  # False past the real block count
    seg_c = jnp.minimum(seg, num_seqs)
    j = b - seg_first[seg_c]
    return QBlocks(
        seq=jnp.minimum(seg_c, num_seqs - 1).astype(jnp.int32),
        tok0=jnp.where(used, seg_start[seg_c] + j * block_q, 0).astype(jnp.int32),
        rows=jnp.where(used, jnp.clip(seg_len[seg_c] - j * block_q, 0, block_q), 0)
        .astype(jnp.int32),
        pos0=(seg_kv[seg_c] - seg_len[seg_c] + j * block_q).astype(jnp.int32),
        kv_len=jnp.where(used, seg_kv[seg_c], 0).astype(jnp.int32),
    )


def token_rows(
    cu_q_lens: jax.Array, kv_lens: jax.Array, num_tokens: int, block_q: int
) -> tuple[jax.Array, jax.Array]:
    """For every token t: (its query block, its row inside the block), each i32[T].

    The inverse of ``build_q_blocks``: token t is row r of block b iff
    ``tok0[b] + r == t`` and ``r < rows[b]``.
    """
    num_seqs = kv_lens.shape[0]
    _, seg_start, _, _, seg_first = _segments(cu_q_lens, kv_lens, num_tokens, block_q)
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    # Token -> segment: the last segment starting at or before t (padding tail = segment S).
    seg = jnp.searchsorted(seg_start, t, side="right").astype(jnp.int32) - 1
    seg = jnp.clip(seg, 0, num_seqs)
    off = t - seg_start[seg]
    return (seg_first[seg] + off // block_q).astype(jnp.int32), (off % block_q).astype(jnp.int32)


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(n)))


def _is_int32(x: jax.Array) -> bool:
    return jnp.dtype(x.dtype) == jnp.dtype(jnp.int32)


def validate_attention_args(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    page_table: jax.Array,
    kv_lens: jax.Array,
    cu_q_lens: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
) -> None:
    """Static checks of the ragged paged attention contract; raises ValueError naming the arg."""
    if q.ndim != 3:
        raise ValueError(f"q must be [T, N, H], got shape {q.shape}")
    if k_cache.ndim != 4:
        raise ValueError(f"k_cache must be [K, P, B, H], got shape {k_cache.shape}")
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(
            f"v_cache must match k_cache: got {v_cache.shape} {v_cache.dtype} vs "
            f"{k_cache.shape} {k_cache.dtype}")
    _, num_q, head = q.shape
    num_kv, _, _, head_k = k_cache.shape
    if head_k != head:
        raise ValueError(f"k_cache head dim {head_k} != q head dim {head}")
    if num_q % num_kv:
        raise ValueError(f"q has {num_q} heads, not a multiple of k_cache's {num_kv} kv heads")
    if page_table.ndim != 2 or not _is_int32(page_table):
        raise ValueError(f"page_table must be i32[S, W], got {page_table.dtype}{page_table.shape}")
    num_seqs = page_table.shape[0]
    if kv_lens.shape != (num_seqs,) or not _is_int32(kv_lens):
        raise ValueError(f"kv_lens must be i32[{num_seqs}], got {kv_lens.dtype}{kv_lens.shape}")
    if cu_q_lens.shape != (num_seqs + 1,) or not _is_int32(cu_q_lens):
        raise ValueError(
            f"cu_q_lens must be i32[{num_seqs + 1}], got {cu_q_lens.dtype}{cu_q_lens.shape}")
    if not isinstance(sm_scale, numbers.Real) or not sm_scale > 0:
        raise ValueError(f"sm_scale must be a positive number, got {sm_scale!r}")
    if sliding_window is not None and (
            isinstance(sliding_window, bool) or not isinstance(sliding_window, numbers.Integral)
            or sliding_window < 1):
        raise ValueError(f"sliding_window must be None or a positive int, got {sliding_window!r}")
    if soft_cap is not None and (not isinstance(soft_cap, numbers.Real) or not soft_cap > 0):
        raise ValueError(f"soft_cap must be None or a positive number, got {soft_cap!r}")


def validate_write_args(
    k_cache: jax.Array,
    v_cache: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slot_mapping: jax.Array,
) -> None:
    """Static checks of the KV-write contract; raises ValueError naming the argument."""
    if k_cache.ndim != 4:
        raise ValueError(f"k_cache must be [K, P, B, H], got shape {k_cache.shape}")
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(
            f"v_cache must match k_cache: got {v_cache.shape} {v_cache.dtype} vs "
            f"{k_cache.shape} {k_cache.dtype}")
    num_kv, _, _, head = k_cache.shape
    if k.ndim != 3 or k.shape[1:] != (num_kv, head):
        raise ValueError(f"k must be [T, {num_kv}, {head}], got shape {k.shape}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {k.shape}, got {v.shape}")
    if slot_mapping.shape != (k.shape[0],) or not _is_int32(slot_mapping):
        raise ValueError(
            f"slot_mapping must be i32[{k.shape[0]}], got {slot_mapping.dtype}"
            f"{slot_mapping.shape}")
