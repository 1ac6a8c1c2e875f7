"""Ragged paged attention and the KV-cache write: the pure-jnp reference path.

This is the CPU path and the reference every kernel is tested against. Kernels in ``ops/`` keep
exactly these signatures; ``ops.backend`` picks one per backend.

Axis letters: T tokens (padded to a bucket), S sequences (padded), W page-table width,
P pages, B page size, K kv heads, N q heads (N = K * G), H head dim; inside the loops, O keys of
one block (or tile), and for the encoder path A query tiles of Q rows.

Layout of one layer's cache: ``k_cache, v_cache: [K, P, B, H]`` (kv-head major, so a shard over
kv heads is a contiguous slab and the per-(kv-head, token) attention dot has its batch axes first).
Page 0 is the null page: padded page-table entries point at it, nothing reads it past a length.

The order of the B·H values *inside* one key page belongs to the backend that writes and reads
the cache (a cache is only ever read by the ops that wrote it): token-major ``[B, H]`` is the
canonical order, used by the kernels and by these functions by default; ``dim_major_keys=True``
stores each key page ``[H, B]``. That is what the CPU path runs (``ops.backend``): the q·k
reduction then runs over a major axis and XLA:CPU vectorises it across keys, instead of a
horizontal sum over H per key; the attention was ~30-40% faster at 128-512 tokens of context
(docs/BENCHMARKS.md). Values stay token-major: p·v reduces over keys, a major axis already.
``keys_dim_major`` converts a canonical cache, for tests.

Contract of the metadata (built by ``serving.engine.model_runner``):
- tokens are grouped by sequence: sequence s owns tokens ``cu_q_lens[s]:cu_q_lens[s+1]``;
- ``cu_q_lens`` is non-decreasing, padded sequences have q_len 0 and kv_len 0, so
  ``cu_q_lens[S]`` is the number of real tokens and tokens past it are padding;
- ``kv_lens[s]`` is the context length of s *after* this step (cached + new tokens); the new
  tokens are the last ``q_len`` positions, causal among themselves;
- ``slot_mapping[t] = page * B + offset`` for real tokens, -1 for padding (the write drops it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Keys scanned per loop iteration of the reference attention (rounded to whole pages).
KV_BLOCK_TOKENS = 64


def write_kv(
    k_cache: jax.Array,  # [K, P, B, H]
    v_cache: jax.Array,  # [K, P, B, H]
    k: jax.Array,  # [T, K, H] this step's keys
    v: jax.Array,  # [T, K, H]
    slot_mapping: jax.Array,  # i32[T], -1 for padding
    *,
    dim_major_keys: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Scatter this step's K/V into their slots; padding (-1) is dropped. Returns the caches.
    ``dim_major_keys``: key pages are stored ``[H, B]`` (module docstring)."""
    num_k, num_pages, page, head = k_cache.shape
    num_tokens = slot_mapping.shape[0]
    slots = slot_mapping.astype(jnp.int32)
    if num_tokens == 1:
        # One row scatter with a single index becomes, on XLA:CPU, a dynamic-update-slice
        # guarded by the drop check, and that copied the whole cache every step (~20x slower
        # decode at T=1 with a large pool). H scalar updates per kv head do not.
        return (_write_scalars(k_cache, k, slots, dim_major_keys),
                _write_scalars(v_cache, v, slots, False))
    # Out-of-range index (not -1, which would wrap) so that mode="drop" discards padding rows.
    slots = jnp.where(slots < 0, num_pages * page, slots)
    v_flat = v_cache.reshape(num_k, num_pages * page, head)
    v_flat = v_flat.at[:, slots].set(v.swapaxes(0, 1).astype(v_cache.dtype), mode="drop")
    if dim_major_keys:
        # [K, P, H, B] view; the two index arrays around a slice put T first: [T, K, H] = k.
        k_pages = k_cache.reshape(num_k, num_pages, head, page)
        k_pages = k_pages.at[:, slots // page, :, slots % page].set(
            k.astype(k_cache.dtype), mode="drop")
        return k_pages.reshape(k_cache.shape), v_flat.reshape(v_cache.shape)
    k_flat = k_cache.reshape(num_k, num_pages * page, head)
    k_flat = k_flat.at[:, slots].set(k.swapaxes(0, 1).astype(k_cache.dtype), mode="drop")
    return k_flat.reshape(k_cache.shape), v_flat.reshape(v_cache.shape)


def _write_scalars(cache: jax.Array, x: jax.Array, slots: jax.Array,
                   dim_major: bool) -> jax.Array:
    """``write_kv`` for one cache as T*H scalar updates of the flat ``[K, P*B*H]`` cache: at
    ``slot*H + h`` (token-major pages) or ``page*H*B + h*B + offset`` (dim-major pages)."""
    num_k, num_pages, page, head = cache.shape
    size = num_pages * page * head
    h = jnp.arange(head, dtype=jnp.int32)
    if dim_major:
        idx = ((slots // page) * (head * page) + slots % page)[:, None] + h * page  # [T, H]
    else:
        idx = slots[:, None] * head + h
    idx = jnp.where((slots < 0)[:, None], size, idx).reshape(-1)  # padding: out of range
    vals = x.swapaxes(0, 1).reshape(num_k, -1).astype(cache.dtype)  # [K, T*H]
    return cache.reshape(num_k, size).at[:, idx].set(vals, mode="drop").reshape(cache.shape)


def keys_dim_major(k_cache: jax.Array) -> jax.Array:
    """A canonical (token-major pages) key cache ``[K, P, B, H]`` re-laid with each page
    ``[H, B]``, for ``dim_major_keys=True``; same shape. Tests and tools only: the engine writes
    its cache through ``write_kv`` of the backend that reads it."""
    num_k, num_pages, page, head = k_cache.shape
    return k_cache.swapaxes(2, 3).reshape(num_k, num_pages, page, head)


def token_layout(
    cu_q_lens: jax.Array, kv_lens: jax.Array, num_tokens: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token (sequence index, absolute position, is-real) from the ragged metadata."""
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    num_seqs = kv_lens.shape[0]
    seq = jnp.clip(jnp.searchsorted(cu_q_lens[1:], t, side="right"), 0, num_seqs - 1)
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    pos = kv_lens[seq] - q_len + (t - cu_q_lens[seq])
    real = t < cu_q_lens[num_seqs]
    return seq.astype(jnp.int32), pos.astype(jnp.int32), real


@functools.partial(jax.jit,
                   static_argnames=("sm_scale", "sliding_window", "soft_cap", "dim_major_keys"))
def ragged_paged_attention_reference(
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
    dim_major_keys: bool = False,
) -> jax.Array:  # [T, N, H], zeros for padding tokens
    """Causal attention of each token over its own sequence's pages, online softmax over blocks.

    Reads only the pages listed in the token's page-table row, and masks every key position at
    or past the token's own position + 1 (so nothing past ``kv_lens`` contributes); masked values
    are zeroed before the value product, so garbage or NaN in unused slots cannot leak.
    The loop runs ``ceil(max(kv_lens) / block)`` times: one compiled shape serves any context.
    ``dim_major_keys``: key pages are stored ``[H, B]`` (module docstring).
    """
    num_tokens, num_q, head = q.shape
    num_kv, _, page, _ = k_cache.shape
    group = num_q // num_kv
    width = page_table.shape[1]
    pages_per_block = max(1, min(width, KV_BLOCK_TOKENS // page))
    if width % pages_per_block:
        pad = pages_per_block - width % pages_per_block
        page_table = jnp.pad(page_table, ((0, 0), (0, pad)))
    block = pages_per_block * page

    seq, pos, real = token_layout(cu_q_lens, kv_lens, num_tokens)
    tok_pages = page_table[seq]  # [T, W']
    qg = (q.astype(jnp.float32) * sm_scale).reshape(num_tokens, num_kv, group, head)
    qg = qg.transpose(1, 0, 2, 3)  # [K, T, G, H]
    if dim_major_keys:
        k_pages = k_cache.reshape(num_kv, -1, head, page)  # [K, P, H, B]: a view, no copy
    lo = jnp.zeros_like(pos) if sliding_window is None else pos - sliding_window + 1

    def body(i: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple:
        m, denom, acc = carry  # [K,T,G], [K,T,G], [K,T,G,H]
        pages = jax.lax.dynamic_slice_in_dim(tok_pages, i * pages_per_block, pages_per_block, 1)
        vb = v_cache[:, pages].reshape(num_kv, num_tokens, block, head).astype(jnp.float32)
        kpos = i * block + jnp.arange(block, dtype=jnp.int32)
        mask = (kpos[None, :] <= pos[:, None]) & (kpos[None, :] >= lo[:, None]) & real[:, None]
        # Broadcast-multiply-reduce rather than a batched dot: with G query rows per (kv head,
        # token) the dot's batches are tiny, and XLA:CPU runs the fused elementwise form faster.
        # NaN in unread slots is dropped by the mask below.
        if dim_major_keys:
            kb = k_pages[:, pages].swapaxes(2, 3)  # [K,T,pages,H,B] -> [K,T,H,pages,B]
            kb = kb.reshape(num_kv, num_tokens, head, block).astype(jnp.float32)  # [K,T,H,O]
            s = (qg[..., None] * kb[:, :, None]).sum(-2)  # [K,T,G,O]
        else:
            kb = k_cache[:, pages].reshape(num_kv, num_tokens, block, head).astype(jnp.float32)
            s = (qg[:, :, :, None, :] * kb[:, :, None, :, :]).sum(-1)  # [K,T,G,O]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        s = jnp.where(mask[None, :, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        corr = jnp.exp(jnp.where(jnp.isfinite(m), m - m_safe, -jnp.inf))
        denom = denom * corr + p.sum(axis=-1)
        vb = jnp.where(mask[None, :, :, None], vb, 0.0)
        acc = acc * corr[..., None] + (p[..., None] * vb[:, :, None, :, :]).sum(-2)
        return m_new, denom, acc

    num_blocks = (jnp.max(kv_lens) + block - 1) // block
    init = (
        jnp.full((num_kv, num_tokens, group), -jnp.inf, jnp.float32),
        jnp.zeros((num_kv, num_tokens, group), jnp.float32),
        jnp.zeros((num_kv, num_tokens, group, head), jnp.float32),
    )
    _, denom, acc = jax.lax.fori_loop(0, num_blocks, body, init)
    out = acc / jnp.where(denom > 0, denom, 1.0)[..., None]
    return out.transpose(1, 0, 2, 3).reshape(num_tokens, num_q, head).astype(q.dtype)


# Query rows per tile of the encoder attention: each sequence starts on a tile boundary.
ENCODER_TILE = 32


@functools.partial(jax.jit, static_argnames=("sm_scale", "tile"))
def ragged_encoder_attention_reference(
    q: jax.Array,  # [T, N, H]
    k: jax.Array,  # [T, K, H] this step's keys (no cache)
    v: jax.Array,  # [T, K, H]
    cu_q_lens: jax.Array,  # i32[S + 1]
    *,
    sm_scale: float,
    tile: int = ENCODER_TILE,
) -> jax.Array:  # [T, N, H], zeros for padding tokens
    """Bidirectional attention of each token over every token of its own sequence in this step.

    The non-causal path of the ops contract, for encoders (BERT-family): whole prompts packed back
    to back as in ``ragged_paged_attention_reference``'s metadata, with no KV pages (nothing is
    cached; ``kv_lens``, ``page_table`` and ``slot_mapping`` play no part).

    Sequences are re-laid so that each starts on a tile boundary (``tile`` rows; the aligned axis
    has the static bound ``T + (S + 1) * tile``); every query tile then belongs to one sequence
    and reads that sequence's key tiles only, one per loop iteration with an online softmax. The
    loop runs ``ceil(max(len) / tile)`` times, so a step costs what its longest sequence needs,
    not what the token bucket could hold. Masked keys are zeroed before the value product, so
    NaN in padding rows cannot leak.
    """
    num_tokens, num_q, head = q.shape
    num_kv = k.shape[1]
    group = num_q // num_kv
    num_seqs = cu_q_lens.shape[0] - 1
    lens = cu_q_lens[1:] - cu_q_lens[:-1]  # [S]
    seq_tiles = (lens + tile - 1) // tile  # [S]
    first_tile = jnp.cumsum(seq_tiles) - seq_tiles  # [S]
    num_tiles = -(-num_tokens // tile) + num_seqs  # static: >= sum(ceil(len / tile))
    size = num_tiles * tile

    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(cu_q_lens[1:], t, side="right"), 0, num_seqs - 1)
    real = t < cu_q_lens[num_seqs]
    dest = jnp.where(real, first_tile[seq] * tile + t - cu_q_lens[seq], size)  # [T]

    def aligned(x: jax.Array) -> jax.Array:  # [T, ...] -> [size, ...], padding rows dropped
        out = jnp.zeros((size, *x.shape[1:]), jnp.float32)
        return out.at[dest].set(x.astype(jnp.float32), mode="drop")

    qa = aligned(q * sm_scale).reshape(num_tiles, tile, num_kv, group, head)
    ka = aligned(k).reshape(num_tiles, tile, num_kv, head)
    va = aligned(v).reshape(num_tiles, tile, num_kv, head)
    tiles = jnp.arange(num_tiles, dtype=jnp.int32)
    tile_seq = jnp.clip(jnp.searchsorted(first_tile + seq_tiles, tiles, side="right"), 0,
                        num_seqs - 1)
    tile_first, tile_len = first_tile[tile_seq], lens[tile_seq]  # [A] (A: tiles)

    def body(j: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple:
        m, denom, acc = carry  # [A,K,G,Q], [A,K,G,Q], [A,K,G,Q,H]
        src = jnp.minimum(tile_first + j, num_tiles - 1)
        kb, vb = ka[src], va[src]  # [A, O, K, H] (O: key rows of the tile)
        valid = (j * tile + jnp.arange(tile, dtype=jnp.int32))[None, :] < tile_len[:, None]
        s = jnp.einsum("aqkgh,aokh->akgqo", qa, kb)  # [A, K, G, Q, O]
        s = jnp.where(valid[:, None, None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        corr = jnp.exp(jnp.where(jnp.isfinite(m), m - m_safe, -jnp.inf))
        denom = denom * corr + p.sum(axis=-1)
        vb = jnp.where(valid[:, :, None, None], vb, 0.0)
        acc = acc * corr[..., None] + jnp.einsum("akgqo,aokh->akgqh", p, vb)
        return m_new, denom, acc

    init = (
        jnp.full((num_tiles, num_kv, group, tile), -jnp.inf, jnp.float32),
        jnp.zeros((num_tiles, num_kv, group, tile), jnp.float32),
        jnp.zeros((num_tiles, num_kv, group, tile, head), jnp.float32),
    )
    _, denom, acc = jax.lax.fori_loop(0, jnp.max(seq_tiles), body, init)
    out = acc / jnp.where(denom > 0, denom, 1.0)[..., None]  # [A, K, G, Q, H]
    out = out.transpose(0, 3, 1, 2, 4).reshape(size, num_q, head)
    out = jnp.where(real[:, None, None], out[jnp.minimum(dest, size - 1)], 0.0)
    return out.astype(q.dtype)
