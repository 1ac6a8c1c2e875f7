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


# Query (and key) rows per tile of the encoder attention, and query tiles per outer iteration of
# its sequence-aligned path (256 query rows: enough batch for the small matmuls).
ENCODER_TILE = 32
ENCODER_GROUP_TILES = 8


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

    Two exact evaluations, chosen per step on device: sequence-aligned tiles
    (``encoder_attention_aligned``) when whole tiles waste at most half their rows, the band on
    the packed axis (``encoder_attention_banded``) when many sequences are much shorter than a
    tile. Either way the cost follows the real tokens and the longest sequence, not the number of
    sequence rows ``S`` the bucket allows. Padding rows (NaN included) cannot leak; their outputs
    are zeros.
    """
    num_tokens = q.shape[0]
    tile = min(tile, num_tokens)
    lens = cu_q_lens[1:] - cu_q_lens[:-1]
    needed = jnp.sum((lens + tile - 1) // tile)
    return jax.lax.cond(
        needed * tile <= 2 * num_tokens,
        functools.partial(encoder_attention_aligned, sm_scale=sm_scale, tile=tile),
        functools.partial(encoder_attention_banded, sm_scale=sm_scale, tile=tile),
        q, k, v, cu_q_lens)


def _online_softmax_step(carry: tuple[jax.Array, jax.Array, jax.Array], s: jax.Array,
                         vb: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Fold one key block into (max, denominator, accumulator) over the last axis of ``s``
    ([..., Q, O] scores, -inf where masked; ``vb`` [..., O, H] zero where masked)."""
    m, denom, acc = carry  # [..., Q], [..., Q], [..., Q, H]
    m_new = jnp.maximum(m, s.max(axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(s - m_safe[..., None])
    corr = jnp.exp(jnp.where(jnp.isfinite(m), m - m_safe, -jnp.inf))
    denom = denom * corr + p.sum(axis=-1)
    acc = acc * corr[..., None] + jnp.einsum("...qo,...oh->...qh", p, vb)
    return m_new, denom, acc


def _softmax_init(shape: tuple[int, ...], head: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    return (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros((*shape, head), jnp.float32))


@functools.partial(jax.jit, static_argnames=("sm_scale", "tile"))
def encoder_attention_aligned(
    q: jax.Array,  # [T, N, H]
    k: jax.Array,  # [T, K, H]
    v: jax.Array,  # [T, K, H]
    cu_q_lens: jax.Array,  # i32[S + 1]
    *,
    sm_scale: float,
    tile: int,
) -> jax.Array:  # [T, N, H]
    """``ragged_encoder_attention_reference`` over sequence-aligned tiles.

    Sequence ``s`` owns ``ceil(len_s / tile)`` query tiles; the outer loop takes
    ``ENCODER_GROUP_TILES`` of them at a time (a dynamic trip count: only the tiles this step
    needs), gathers their query rows from the packed axis, and the inner loop walks each tile's
    own sequence one key tile at a time with an online softmax. Rows past a sequence's end are
    gathered as zeros, masked, and never written back.
    """
    num_tokens, num_q, head = q.shape
    num_kv = k.shape[1]
    group = num_q // num_kv
    num_seqs = cu_q_lens.shape[0] - 1
    group_tiles = min(ENCODER_GROUP_TILES, -(-num_tokens // tile))
    lens = cu_q_lens[1:] - cu_q_lens[:-1]  # [S]
    tile_ends = jnp.cumsum((lens + tile - 1) // tile)  # [S] each sequence's last tile + 1
    first_tile = tile_ends - (lens + tile - 1) // tile  # [S]
    rows = jnp.arange(tile, dtype=jnp.int32)
    qs = q.astype(jnp.float32) * sm_scale
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)

    def gather(x: jax.Array, idx: jax.Array) -> jax.Array:  # [T, X, H], i32[A, R] -> [A, R, X, H]
        return jnp.take(x, idx, axis=0, mode="fill", fill_value=0.0)

    def tiles_of(i: jax.Array, out: jax.Array) -> jax.Array:
        tiles = i * group_tiles + jnp.arange(group_tiles, dtype=jnp.int32)  # [A] (A: tiles)
        seq = jnp.clip(jnp.searchsorted(tile_ends, tiles, side="right"), 0, num_seqs - 1)
        start = cu_q_lens[seq]  # [A]
        n = jnp.where(tiles < tile_ends[-1], lens[seq], 0)  # [A] 0 for tiles past the last
        pos = (tiles - first_tile[seq])[:, None] * tile + rows  # [A, Q] position in sequence
        q_idx = jnp.where(pos < n[:, None], start[:, None] + pos, num_tokens)  # T: drop
        qt = gather(qs, q_idx).reshape(group_tiles, tile, num_kv, group, head)
        qt = qt.transpose(0, 2, 3, 1, 4).reshape(group_tiles, num_kv, group * tile, head)

        def key_tile(j: jax.Array, carry: tuple) -> tuple:
            k_pos = j * tile + rows  # [O]
            k_ok = k_pos < n[:, None]  # [A, O]
            k_idx = jnp.where(k_ok, start[:, None] + k_pos, num_tokens)
            kb = gather(kf, k_idx).transpose(0, 2, 1, 3)  # [A, K, O, H]
            vb = gather(vf, k_idx).transpose(0, 2, 1, 3)
            s = jnp.einsum("akqh,akoh->akqo", qt, kb)  # [A, K, G*Q, O]
            s = jnp.where(k_ok[:, None, None, :], s, -jnp.inf)
            return _online_softmax_step(carry, s, vb)

        init = _softmax_init((group_tiles, num_kv, group * tile), head)
        _, denom, acc = jax.lax.fori_loop(0, (jnp.max(n) + tile - 1) // tile, key_tile, init)
        o = acc / jnp.where(denom > 0, denom, 1.0)[..., None]  # [A, K, G*Q, H]
        o = o.reshape(group_tiles, num_kv, group, tile, head).transpose(0, 3, 1, 2, 4)
        return out.at[q_idx.reshape(-1)].set(o.reshape(-1, num_q, head), mode="drop")

    steps = (tile_ends[-1] + group_tiles - 1) // group_tiles
    out = jax.lax.fori_loop(0, steps, tiles_of, jnp.zeros((num_tokens, num_q, head), jnp.float32))
    return out.astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale", "tile"))
def encoder_attention_banded(
    q: jax.Array,  # [T, N, H]
    k: jax.Array,  # [T, K, H]
    v: jax.Array,  # [T, K, H]
    cu_q_lens: jax.Array,  # i32[S + 1]
    *,
    sm_scale: float,
    tile: int,
) -> jax.Array:  # [T, N, H]
    """``ragged_encoder_attention_reference`` as banded block attention on the packed axis.

    Query tile ``a`` (``tile`` consecutive packed tokens, possibly of several sequences) reads the
    key tiles from the one holding its first token's sequence start to the one holding its last
    token's sequence end, one per iteration, and a key counts for a query only when both belong
    to the same sequence. The loop runs as often as the widest band (at most 3 times when every
    sequence fits in a tile), over all ``ceil(T / tile)`` query tiles.
    """
    num_tokens, num_q, head = q.shape
    num_kv = k.shape[1]
    group = num_q // num_kv
    num_seqs = cu_q_lens.shape[0] - 1
    num_tiles = -(-num_tokens // tile)
    size = num_tiles * tile  # the packed axis padded to whole tiles

    t = jnp.arange(size, dtype=jnp.int32)
    real = t < cu_q_lens[num_seqs]
    seq = jnp.clip(jnp.searchsorted(cu_q_lens[1:], t, side="right"), 0, num_seqs - 1)
    seg = jnp.where(real, seq, -1).reshape(num_tiles, tile)  # sequence of each token, -1: none
    tiled_real = real.reshape(num_tiles, tile)
    start = cu_q_lens[seq].reshape(num_tiles, tile)
    end = cu_q_lens[seq + 1].reshape(num_tiles, tile)
    lo = jnp.min(jnp.where(tiled_real, start, size), axis=1) // tile  # [A] first key tile
    hi = jnp.max(jnp.where(tiled_real, end - 1, -1), axis=1) // tile  # [A] last key tile
    width = jnp.maximum(hi - lo + 1, 0)  # [A]

    def tiled(x: jax.Array, scale: float = 1.0) -> jax.Array:  # [T, X, H] -> [A, X, tile, H]
        x = jnp.pad(x.astype(jnp.float32) * scale, ((0, size - num_tokens), (0, 0), (0, 0)))
        return x.reshape(num_tiles, tile, *x.shape[1:]).transpose(0, 2, 1, 3)

    qt = tiled(q, sm_scale).reshape(num_tiles, num_kv, group, tile, head)
    qt = qt.reshape(num_tiles, num_kv, group * tile, head)
    kt, vt = tiled(k), tiled(v)  # [A, K, O, H] (O: key rows of a tile)
    q_seg = jnp.tile(seg, (1, group))  # [A, G*Q] in qt's row order

    def key_tile(j: jax.Array, carry: tuple) -> tuple:
        src = jnp.clip(lo + j, 0, num_tiles - 1)  # [A]
        key_seg = seg[src]  # [A, O]
        valid = ((j < width)[:, None, None] & (q_seg[:, :, None] == key_seg[:, None, :])
                 & (key_seg >= 0)[:, None, :])  # [A, G*Q, O]
        s = jnp.einsum("akqh,akoh->akqo", qt, kt[src])  # [A, K, G*Q, O]
        s = jnp.where(valid[:, None], s, -jnp.inf)
        vb = jnp.where((key_seg >= 0)[:, None, :, None], vt[src], 0.0)
        return _online_softmax_step(carry, s, vb)

    init = _softmax_init((num_tiles, num_kv, group * tile), head)
    _, denom, acc = jax.lax.fori_loop(0, jnp.max(width), key_tile, init)
    out = acc / jnp.where(denom > 0, denom, 1.0)[..., None]  # [A, K, G*Q, H]
    out = out.reshape(num_tiles, num_kv, group, tile, head).transpose(0, 3, 1, 2, 4)
    out = out.reshape(size, num_q, head)[:num_tokens]
    return jnp.where(real[:num_tokens, None, None], out, 0.0).astype(q.dtype)
