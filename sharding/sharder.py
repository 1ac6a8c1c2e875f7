"""Sharder: puts one engine replica's weights, KV cache and step inputs on its mesh.

Who calls what:
- the weight loaders call ``sharder.place(path, logical_axes, host_array)`` for every weight as it
  is read (``models.weights.Place``): the array goes straight into its ``NamedSharding``, each
  device receiving only its slice; orbax restores ask ``place.restore_target`` for the sharding to
  read each array into;
- ``serving.engine.sharded.shard_loaded`` rebuilds the model for the mesh (kv-head replication,
  shard_map attention) and places any weight not placed yet;
- ``serving.engine.model_runner`` calls ``zeros_kv`` for each cache array, ``put_replicated`` for
  its cached constants, ``put_inputs`` for each step's inputs, ``replicate`` on the logits inside
  the step, and ``share_step`` / ``follow_steps`` when the mesh spans several processes.

Shardings come only from ``sharding.rules`` applied to the logical axes the arrays declare.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sharding.distributed import Lockstep
from sharding.mesh import MODEL, describe
from sharding.rules import (
    KV_CACHE_AXES,
    RULES,
    ShardingError,
    partition_spec,
    plan_kv_heads,
)

Axes = tuple[str | None, ...]


def replicate_kv_heads(x: Any, axis: int, r: int, xp: Any = np) -> Any:
    """Fused-qkv layout ``[..., K, G + 2, ...]`` (``axis`` is K) → ``[..., K * r, G / r + 2, ...]``.

    Query heads ``g = j * G' + g'`` of kv head k move to new kv head ``k * r + j``, which gets a
    copy of k's key and value. The flattened query-head order ``n = k * G + g`` is unchanged, so
    the output projection ``[N, H, D]`` needs no change.
    """
    k, g = x.shape[axis], x.shape[axis + 1] - 2
    if g % r:
        raise ShardingError(f"{g} query heads per kv head do not split into {r} replicas")
    q = xp.take(x, xp.arange(g), axis=axis + 1)
    kv = xp.take(x, xp.arange(g, g + 2), axis=axis + 1)
    q = q.reshape((*x.shape[:axis], k * r, g // r, *x.shape[axis + 2:]))
    return xp.concatenate([q, xp.repeat(kv, r, axis=axis)], axis=axis + 1)


def kv_replicas_of(axes: Axes, shape: tuple[int, ...], tp: int) -> tuple[int, int]:
    """(kv axis index, replicas) for a fused-qkv-layout array; (-1, 1) for anything else."""
    if "kv_heads" not in axes:
        return -1, 1
    i = axes.index("kv_heads")
    k = shape[i]
    if i + 1 >= len(shape) or axes[i + 1] is not None:  # not the [K, G + 2] fused layout
        return i, 1
    return i, plan_kv_heads(k * (shape[i + 1] - 2), k, tp)


class Placement:
    """The loaders' ``place`` hook for one sharder (a callable, plus the orbax restore plan)."""

    def __init__(self, sharder: Sharder) -> None:
        self.sharder = sharder

    def __call__(self, path: str, axes: Axes, value: np.ndarray) -> jax.Array:
        s = self.sharder
        i, r = kv_replicas_of(axes, value.shape, s.tp)
        if r > 1:
            value = replicate_kv_heads(value, i, r)
        return s.put(value, s.sharding(axes, value.shape))

    def restore_target(self, path: str, axes: Axes, shape: tuple[int, ...], dtype: Any
                       ) -> tuple[jax.ShapeDtypeStruct, Callable[[jax.Array], jax.Array] | None]:
        """What orbax should read ``path`` into, and the on-device fix-up to apply after.

        Usually the final sharding and no fix-up: each device reads only its own slice. With kv
        heads replicated the checkpoint's ``[D, K, G+2, H]`` is read split over D instead and
        regrouped on device by one jitted reshuffle into ``[D, K', G'+2, H]``.
        """
        s = self.sharder
        i, r = kv_replicas_of(axes, shape, s.tp)
        if r == 1:
            return jax.ShapeDtypeStruct(shape, dtype, sharding=s.sharding(axes, shape)), None
        spec: list[str | None] = [None] * len(shape)
        if i != 0 and shape[0] % s.tp == 0:
            spec[0] = MODEL
        read = NamedSharding(s.mesh, P(*spec))
        new_shape = replicate_kv_heads(np.empty(shape, np.int8), i, r).shape
        fix = _regroup(i, r, s.sharding(axes, new_shape))
        return jax.ShapeDtypeStruct(shape, dtype, sharding=read), fix


@functools.lru_cache(maxsize=64)
def _regroup(axis: int, r: int, out: NamedSharding) -> Callable[[jax.Array], jax.Array]:
    """One jitted kv-head regrouping per (layout, sharding): every layer reuses its compile."""
    return jax.jit(functools.partial(replicate_kv_heads, axis=axis, r=r, xp=jnp),
                   out_shardings=out)


class Sharder:
    """One model replica on one ``(data, model)`` mesh (``data`` of size 1 within a replica)."""

    def __init__(self, mesh: Mesh, rules: dict[str, str | None] | None = None,
                 lockstep: Lockstep | None = None) -> None:
        self.mesh = mesh
        self.rules = dict(RULES if rules is None else rules)
        self.tp = int(mesh.shape[MODEL])
        self.replicated = NamedSharding(mesh, P())
        self.multiprocess = jax.process_count() > 1
        self.lockstep = lockstep if lockstep is not None or not self.multiprocess \
            else Lockstep()
        self.place = Placement(self)

    @property
    def devices(self) -> list[Any]:
        return list(np.asarray(self.mesh.devices).flat)

    @property
    def local_devices(self) -> list[Any]:
        """This process's devices of the mesh (all of them on a single host)."""
        return [d for d in self.devices if d.process_index == jax.process_index()]

    def agree_min(self, name: str, value: int) -> int:
        """The smallest ``value`` over all processes (start-up sizing decisions); identity on a
        single process."""
        return value if self.lockstep is None else self.lockstep.agree_min(name, value)

    def describe(self) -> str:
        return describe(self.mesh)

    # ---- shardings ---------------------------------------------------------------------------
    def spec(self, axes: Axes, shape: tuple[int, ...]) -> P:
        return partition_spec(axes, shape, dict(self.mesh.shape), self.rules)

    def sharding(self, axes: Axes, shape: tuple[int, ...]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(axes, shape))

    def kv_replicas(self, num_heads: int, num_kv_heads: int) -> int:
        """Copies of each kv head this mesh needs (raises ShardingError naming valid sizes)."""
        return plan_kv_heads(num_heads, num_kv_heads, self.tp)

    def kv_shards(self, num_kv_heads: int) -> int:
        """Over how many devices one layer's cache is split (the rest of the mesh replicates)."""
        spec = self.spec(KV_CACHE_AXES, (num_kv_heads, 1, 1, 1))
        return self.tp if spec and spec[0] == MODEL else 1

    # ---- arrays ------------------------------------------------------------------------------
    def put(self, value: np.ndarray, sharding: NamedSharding) -> jax.Array:
        """Host array → global array: each device gets only its slice (any process count)."""
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])

    def zeros_kv(self, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        """One layer's K or V cache ``[K, P, B, H]``, allocated shard by shard on device."""
        sharding = self.sharding(KV_CACHE_AXES, shape)
        return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()

    def put_replicated(self, x: Any) -> jax.Array:
        if isinstance(x, jax.Array) and x.sharding == self.replicated:
            return x
        if self.multiprocess:
            return self.put(np.asarray(x), self.replicated)
        return jax.device_put(x, self.replicated)

    def put_inputs(self, tree: Any) -> Any:
        """Step inputs (StepInputs, SamplingInputs, ...): replicated on every device."""
        if self.multiprocess:
            return jax.tree_util.tree_map(self.put_replicated, tree)
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        todo = [i for i, x in enumerate(leaves)
                if not (isinstance(x, jax.Array) and x.sharding == self.replicated)]
        placed = jax.device_put([leaves[i] for i in todo], self.replicated)  # one batched copy
        for i, x in zip(todo, placed, strict=True):
            leaves[i] = x
        return jax.tree_util.tree_unflatten(treedef, leaves)

    def replicate(self, x: jax.Array) -> jax.Array:
        """Inside a jitted step: make ``x`` whole on every device."""
        return jax.lax.with_sharding_constraint(x, self.replicated)

    def gather_logits(self, logits: jax.Array) -> jax.Array:
        """Inside a jitted step: LM-head logits ``[S, V]`` whole on every device, so that the
        sampler computes the same thing on any mesh.

        The logits are first pinned to the vocab split the LM head produces, then gathered: a
        bare replicated constraint lets XLA satisfy it by gathering the whole ``[V, D]`` table
        before the matmul instead (measured: 113 MB per step for SmolLM2 instead of 1.5 MB).
        """
        split = self.sharding((None, "vocab"), tuple(logits.shape))
        return self.replicate(jax.lax.with_sharding_constraint(logits, split))

    # ---- multi-host lockstep -----------------------------------------------------------------
    def share_step(self, msg: Any) -> Any:
        """Leader of a multi-process mesh: publish the step about to run (else a no-op)."""
        return msg if self.lockstep is None else self.lockstep.share(msg)

    def follow_steps(self) -> Iterator[Any]:
        if self.lockstep is None:
            raise RuntimeError("follow_steps needs a mesh spanning several processes")
        return self.lockstep.steps()
