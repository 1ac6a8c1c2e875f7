"""A worker process with 8 simulated CPU devices, shared by the sharding tests.

``--xla_force_host_platform_device_count`` only takes effect when JAX starts its CPU backend, and
the pytest process may already have started it with one device (or must keep one device for the
other tests). So the mesh tests run their bodies (``tests/sharding/scenarios.py``) in one spawned
worker whose environment carries the flag: one JAX start-up, one warm compilation cache, and the
usual pytest report per test (a failing assertion comes back with the worker's traceback).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest

from tests.sharding import scenarios

NUM_DEVICES = 8


class MeshWorker:
    def __init__(self, pool: ProcessPoolExecutor) -> None:
        self.pool = pool

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 900) -> Any:
        """Run ``fn(*args)`` (a module-level function) in the worker and return its result."""
        return self.pool.submit(fn, *args).result(timeout=timeout)


@pytest.fixture(scope="session")
def mesh_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshWorker]:
    flag = f"--xla_force_host_platform_device_count={NUM_DEVICES}"
    old = os.environ.get("XLA_FLAGS")
    os.environ["XLA_FLAGS"] = f"{old} {flag}" if old else flag
    try:  # the spawned worker copies the environment when it starts, at the first submit
        pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        cache = str(tmp_path_factory.mktemp("xla_cache"))
        count = pool.submit(scenarios.init_worker, cache).result(timeout=300)
    finally:
        if old is None:
            del os.environ["XLA_FLAGS"]
        else:
            os.environ["XLA_FLAGS"] = old
    assert count == NUM_DEVICES
    yield MeshWorker(pool)
    pool.shutdown(cancel_futures=True)
