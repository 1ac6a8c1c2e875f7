"""The one table from logical axes to mesh axes, and the head plan for tensor parallelism.

Models declare logical axes on their parameters (``models.layers``: metadata ``logical_axes``) and
the runner declares the KV cache's (``KV_CACHE_AXES``); nothing outside this module names a mesh
axis for them. The plan is Megatron-style tensor parallelism over the ``model`` axis:

- fused qkv ``[D, K, G + 2, H]`` and the KV cache ``[K, P, B, H]`` split over kv heads, so each
  shard holds whole GQA groups and attention needs no communication;
- the output projection ``[N, H, D]`` splits over query heads (the same blocks, since
  ``n = k * G + g``) and the MLP over its hidden dim F: one all-reduce after each;
- embeddings / LM head split over the vocabulary;
- norms, the residual stream and every step input are replicated.

A dimension the mesh axis does not divide evenly stays replicated (vocab and mlp only: a 259-token
test vocabulary on 8 shards, say); heads must divide (``plan_kv_heads`` refuses otherwise).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from jax.sharding import PartitionSpec

from sharding.mesh import MODEL

log = logging.getLogger("xlaserve.sharding")

# logical axis -> mesh axis (None: replicated).
RULES: Mapping[str, str | None] = {
    "vocab": MODEL,
    "embed": None,
    "heads": MODEL,
    "kv_heads": MODEL,
    "head_dim": None,
    "mlp": MODEL,
    "norm": None,
}

# One layer's cache ``k_cache, v_cache: [K, P, B, H]`` (pages and page offsets never shard).
KV_CACHE_AXES: tuple[str | None, ...] = ("kv_heads", None, None, "head_dim")

# Axes that must divide exactly (the head plan guarantees it); the others may fall back.
_STRICT = frozenset({"heads", "kv_heads"})


class ShardingError(ValueError):
    """A model does not fit the requested mesh; the message names what would."""


def partition_spec(axes: tuple[str | None, ...], shape: tuple[int, ...],
                   mesh_shape: Mapping[str, int],
                   rules: Mapping[str, str | None] = RULES) -> PartitionSpec:
    """The PartitionSpec for an array with these logical axes on a mesh of ``mesh_shape``."""
    if len(axes) != len(shape):
        raise ShardingError(f"logical axes {axes} do not match shape {shape}")
    out: list[str | None] = []
    used: set[str] = set()
    for name, dim in zip(axes, shape, strict=True):
        target = rules.get(name) if name is not None else None
        if target is None or mesh_shape.get(target, 1) == 1 or target in used:
            out.append(None)
            continue
        size = mesh_shape[target]
        if dim % size:
            assert name is not None
            if name in _STRICT:
                raise ShardingError(f"{name} dimension {dim} is not divisible by the {target} "
                                    f"axis of size {size}")
            _warn_once(name, dim, size)
            out.append(None)
            continue
        out.append(target)
        used.add(target)
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


_warned: set[tuple[str, int, int]] = set()


def _warn_once(name: str, dim: int, size: int) -> None:
    if (name, dim, size) not in _warned:
        _warned.add((name, dim, size))
        log.warning("%s dimension %d does not divide over %d shards: kept replicated",
                    name, dim, size)


# ---- the head plan -------------------------------------------------------------------------------
def valid_tp_sizes(num_heads: int, num_kv_heads: int) -> list[int]:
    """Tensor-parallel sizes that split heads evenly: divisors of the kv heads, or multiples of
    them that divide the query heads (each kv head then replicated on tp / K shards)."""
    out = {d for d in range(1, num_kv_heads + 1) if num_kv_heads % d == 0}
    out |= {m for m in range(num_kv_heads, num_heads + 1, num_kv_heads) if num_heads % m == 0}
    return sorted(out)


def plan_kv_heads(num_heads: int, num_kv_heads: int, tp: int) -> int:
    """How many copies of each kv head tensor parallelism of size ``tp`` needs (1: none).

    tp dividing K: every shard holds K / tp whole GQA groups. tp a multiple of K (vLLM's
    behaviour): each kv head is replicated on tp / K shards and each shard gets N / tp of its
    query heads, so the model runs with K' = tp kv heads of group size G' = N / tp. Anything else
    would need padded heads, which we refuse (padding wastes compute and changes the weights).
    """
    if num_kv_heads % tp == 0:
        return 1
    if tp % num_kv_heads == 0 and num_heads % tp == 0:
        return tp // num_kv_heads
    sizes = ", ".join(map(str, valid_tp_sizes(num_heads, num_kv_heads)))
    raise ShardingError(
        f"tensor_parallel_size={tp} cannot split {num_heads} query heads / {num_kv_heads} kv "
        f"heads evenly; valid sizes for this model: {sizes} (heads are not padded)")
