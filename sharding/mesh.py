"""Device meshes: ``(data, model)`` grids built from the parallelism sizes the user asked for.

Callers: ``serving.engine.sharded`` (one engine's mesh, and the per-replica meshes of data
parallelism) and the tests. The ``model`` axis carries tensor parallelism (what the rules table in
``sharding.rules`` shards weights and the KV cache over); the ``data`` axis indexes independent
engine replicas (see docs/SHARDING.md for why replicas rather than batch sharding).

Invariant: a mesh uses the first ``dp * tp`` devices of ``jax.devices()`` in order, so replica i
owns devices ``[i * tp, (i + 1) * tp)``; on a multi-host slice these are all processes' devices
(``jax.devices()`` is global once ``jax.distributed`` is initialised).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

DATA, MODEL = "data", "model"
AXES = (DATA, MODEL)


class MeshError(ValueError):
    """The requested mesh cannot be built (bad spec, or not enough devices)."""


@dataclass(frozen=True)
class MeshShape:
    data: int = 1  # dp: engine replicas
    model: int = 1  # tp: tensor-parallel shards per replica

    def __post_init__(self) -> None:
        if self.data < 1 or self.model < 1:
            raise MeshError(f"mesh sizes must be >= 1, got data={self.data} model={self.model}")

    @property
    def num_devices(self) -> int:
        return self.data * self.model

    def __str__(self) -> str:
        return f"data={self.data},model={self.model}"


_PAIR = re.compile(r"^\s*(\d+)\s*[x×*]\s*(\d+)\s*$")


def parse_mesh(spec: str) -> MeshShape:
    """``"data=2,model=4"`` (either order, either key optional) or ``"2x4"`` (data x model)."""
    if m := _PAIR.match(spec):
        return MeshShape(int(m.group(1)), int(m.group(2)))
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, val = part.partition("=")
        key = key.strip().lower()
        aliases = {"data": DATA, "dp": DATA, "model": MODEL, "tp": MODEL, "tensor": MODEL}
        if not sep or key not in aliases or not val.strip().isdigit():
            raise MeshError(
                f"bad --mesh {spec!r}: use 'data=D,model=M' (e.g. 'data=2,model=4') or 'DxM'")
        sizes[aliases[key]] = int(val)
    if not sizes:
        raise MeshError(f"bad --mesh {spec!r}: empty")
    return MeshShape(sizes.get(DATA, 1), sizes.get(MODEL, 1))


def resolve_shape(tensor_parallel_size: int = 1, data_parallel_size: int = 1,
                  mesh: str | None = None) -> MeshShape:
    """The mesh shape from the CLI: ``--mesh`` wins, but must agree with explicit sizes."""
    if mesh is None:
        return MeshShape(data_parallel_size, tensor_parallel_size)
    shape = parse_mesh(mesh)
    for name, given, got in (("tensor_parallel_size", tensor_parallel_size, shape.model),
                             ("data_parallel_size", data_parallel_size, shape.data)):
        if given not in (1, got):
            raise MeshError(f"--mesh {mesh!r} gives {got} for {name} but {given} was also given")
    return shape


def make_mesh(shape: MeshShape, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``(data, model)`` mesh over the first ``shape.num_devices`` devices."""
    devs = list(jax.devices() if devices is None else devices)
    need = shape.num_devices
    if len(devs) < need:
        hint = ""
        if devs and devs[0].platform == "cpu":
            hint = (f"; on CPU, simulate devices with XLA_FLAGS="
                    f"--xla_force_host_platform_device_count={need} (set before JAX starts)")
        raise MeshError(f"mesh {shape} needs {need} devices but {len(devs)} are visible{hint}")
    grid = np.empty((shape.data, shape.model), dtype=object)
    for i, d in enumerate(devs[:need]):
        grid[i // shape.model, i % shape.model] = d
    return Mesh(grid, AXES)


def replica_meshes(mesh: Mesh) -> list[Mesh]:
    """One ``(1, model)`` mesh per data-parallel row: each engine replica's own devices."""
    grid = np.asarray(mesh.devices)
    return [Mesh(grid[i:i + 1], AXES) for i in range(grid.shape[0])]


def describe(mesh: Mesh) -> str:
    ids = [d.id for d in np.asarray(mesh.devices).flat]
    span = f"{ids[0]}..{ids[-1]}" if ids == list(range(ids[0], ids[-1] + 1)) else str(ids)
    shape = ", ".join(f"{k}={v}" for k, v in mesh.shape.items())
    return f"mesh({shape}) over {mesh.devices.flat[0].platform} devices {span}"
