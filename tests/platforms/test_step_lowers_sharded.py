"""The engine's step lowers for ``cuda`` and ``tpu`` with its real shardings on an 8-device
mesh: TP=8, and DP=2 x TP=4 (two engine replicas on 4 devices each, both exported). The mesh is
8 simulated CPU devices in a worker process (``tests/sharding/conftest.py``); the exported
module is checked as on one device (``tests/platforms/steps.py``), per-shard cache sizes
included.

Default run: Llama-3-8B's shape cut to 2 layers at every bucket. ``-m slow``: Gemma-3-12B's
shape, and every layer. SmolLM2-135M has 9 query heads: no mesh of 4 or 8 splits it (the
engine refuses it, ``Sharder.kv_replicas``).
"""

from __future__ import annotations

import pytest

from tests.platforms import steps
from tests.platforms.test_step_lowers import BUCKETS
from tests.sharding.conftest import MeshWorker


def _check(worker: MeshWorker, name: str, platform: str, mesh: str,
           num_layers: int | None) -> None:
    passed = worker.call(steps.check_model_on_mesh, name, platform, mesh, num_layers)
    replicas = steps.MESHES[mesh].data
    assert sum(" step[T=" in p for p in passed) == replicas * len(BUCKETS), passed
    assert any(" sample[S=" in p for p in passed) and any(" argmax[S=" in p for p in passed)


@pytest.mark.parametrize("platform", steps.PLATFORMS)
@pytest.mark.parametrize("mesh", sorted(steps.MESHES))
def test_step_lowers_on_mesh(mesh_worker: MeshWorker, mesh: str, platform: str) -> None:
    _check(mesh_worker, "llama3-8b", platform, mesh, 2)


@pytest.mark.slow
@pytest.mark.parametrize("platform", steps.PLATFORMS)
@pytest.mark.parametrize("mesh", sorted(steps.MESHES))
@pytest.mark.parametrize("name", ["llama3-8b", "gemma3-12b"])
def test_step_lowers_on_mesh_all_layers(mesh_worker: MeshWorker, name: str, mesh: str,
                                        platform: str) -> None:
    _check(mesh_worker, name, platform, mesh, None)
