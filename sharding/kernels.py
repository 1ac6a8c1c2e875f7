"""Attention ops wrapped in ``shard_map`` over kv heads: each device runs the single-device op on
its own heads, with no communication.

Called by ``serving.engine.sharded`` when it rebuilds a model for a mesh: the wrappers replace the
model's ``attn_fn`` / ``write_fn`` (same signatures as ``ops.attention``, so the model code does
not change). Kernels in ``ops/`` stay single-device; sharding them lives here.

Specs (axis letters as in ``ops.attention``): q/out ``[T, N, H]`` split on N, caches
``[K, P, B, H]`` split on K, new keys/values ``[T, K, H]`` split on K, metadata replicated. N and K
split into the same contiguous blocks because query head ``n = k * G + g`` (fused-qkv layout), so
shard i holds query heads ``[i * N / tp, (i + 1) * N / tp)`` and exactly their kv heads.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from sharding.mesh import MODEL


def _shard_map(f: Any, mesh: Mesh, in_specs: tuple, out_specs: Any) -> Any:
    # check_vma=False: the reference attention's fori_loop carries are not annotated with
    # varying-manual-axes types, and every output here is per-shard by construction.
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


class ShardedAttention:
    """``ops.attention.ragged_paged_attention_reference``'s signature, run per kv-head shard."""

    def __init__(self, base: Any, mesh: Mesh, axis: str = MODEL) -> None:
        self.base, self.mesh, self.axis = base, mesh, axis

    def __call__(self, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                 page_table: jax.Array, kv_lens: jax.Array, cu_q_lens: jax.Array, *,
                 sm_scale: float, sliding_window: int | None = None,
                 soft_cap: float | None = None) -> jax.Array:
        f = functools.partial(self.base, sm_scale=sm_scale, sliding_window=sliding_window,
                              soft_cap=soft_cap)
        heads, cache, rep = P(None, self.axis, None), P(self.axis), P()
        return _shard_map(f, self.mesh, (heads, cache, cache, rep, rep, rep), heads)(
            q, k_cache, v_cache, page_table, kv_lens, cu_q_lens)


class ShardedEncoderAttention:
    """``ops.attention.ragged_encoder_attention_reference``'s signature (the non-causal,
    pageless path), run per head shard: q/k/v/out ``[T, heads, H]`` split on heads."""

    def __init__(self, base: Any, mesh: Mesh, axis: str = MODEL) -> None:
        self.base, self.mesh, self.axis = base, mesh, axis

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, cu_q_lens: jax.Array, *,
                 sm_scale: float) -> jax.Array:
        f = functools.partial(self.base, sm_scale=sm_scale)
        heads = P(None, self.axis, None)
        return _shard_map(f, self.mesh, (heads, heads, heads, P()), heads)(q, k, v, cu_q_lens)


class ShardedWriteKV:
    """``ops.attention.write_kv``'s signature: each shard scatters its own heads' keys/values."""

    def __init__(self, base: Any, mesh: Mesh, axis: str = MODEL) -> None:
        self.base, self.mesh, self.axis = base, mesh, axis

    def __call__(self, k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array,
                 slot_mapping: jax.Array) -> tuple[jax.Array, jax.Array]:
        cache, heads = P(self.axis), P(None, self.axis, None)
        out: tuple[jax.Array, jax.Array] = _shard_map(
            self.base, self.mesh, (cache, cache, heads, heads, P()), (cache, cache))(
            k_cache, v_cache, k, v, slot_mapping)
        return out


def unwrap(fn: Any) -> Any:
    """The single-device op behind a wrapper (itself if it is not one)."""
    while isinstance(fn, ShardedAttention | ShardedWriteKV | ShardedEncoderAttention):
        fn = fn.base
    return fn
