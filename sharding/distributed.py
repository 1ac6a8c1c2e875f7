"""Multi-host: ``jax.distributed`` start-up and the lockstep channel between engine processes.

JAX's multi-controller runtime is the distributed engine: every process runs the same program on
its own devices, and every jitted step over the global mesh must be entered by all processes in
the same order. Process 0 (the leader) owns the HTTP server, the scheduler and the KV page
allocator; the other processes (followers) own nothing but their devices. Per step the leader
publishes the padded host inputs it is about to run (``Lockstep.share``), and each follower
replays them through the same runner code (``Lockstep.steps``), so all processes enter the same
compiled step with identical, replicated inputs.

The channel is the ``jax.distributed`` coordination service's key-value store, not a collective:
a follower waits for the next step with a blocking get that it simply re-issues on timeout, so an
idle server is fine (a waiting gloo collective would time out after 30 s). Messages are pickled
tuples of numpy arrays; like ``jax.distributed`` itself, this assumes the processes trust each
other and the coordinator port is not exposed.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

log = logging.getLogger("xlaserve.distributed")

_PREFIX = "xlaserve/lockstep"
_POLL_MS = 60_000  # a follower re-issues its wait this often while the leader is idle
_READY_TIMEOUT_MS = 30 * 60_000  # start-up: loading weights may take a while on some hosts


class DistributedError(ValueError):
    """Incomplete or inconsistent multi-host settings."""


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Start ``jax.distributed`` if a multi-process run is configured; True if it was.

    Arguments win over JAX's standard environment variables ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. Must run before anything touches a JAX backend.
    On CPU the cross-process collectives are gloo's.
    """
    env = os.environ
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    if coordinator is None and (num_processes or 1) == 1:
        return False
    missing = [name for name, v in (("--distributed-coordinator", coordinator),
                                    ("--num-processes", num_processes),
                                    ("--process-id", process_id)) if v is None]
    if missing:
        raise DistributedError(f"multi-host serving needs {', '.join(missing)} as well "
                               f"(or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / "
                               f"JAX_PROCESS_ID environment variables)")
    assert num_processes is not None and process_id is not None
    if not 0 <= process_id < num_processes:
        raise DistributedError(f"--process-id {process_id} is outside [0, {num_processes})")
    if "jax_cpu_collectives_implementation" in jax.config.values:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    log.info("jax.distributed: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count())
    return True


def _client() -> Any:
    from jax._src import distributed  # the coordination-service client; no public handle yet
    client = distributed.global_state.client
    if client is None:
        raise DistributedError("jax.distributed is not initialised")
    return client


def _to_host(tree: Any) -> Any:
    """Device arrays (replicated constants the leader cached) become numpy before pickling."""
    return jax.tree_util.tree_map(
        lambda x: np.asarray(x) if isinstance(x, jax.Array) else x, tree)


class Lockstep:
    """The leader → followers step channel of one engine (see the module docstring).

    Contract: the leader calls ``share(msg)`` once per step, before dispatching that step; each
    follower iterates ``steps()`` and runs every message exactly as the leader did. ``stop()``
    (also registered at exit) ends the followers' iteration. Step ``n`` lives under key
    ``<prefix>/<n>`` until every follower has read it; the last reader deletes it.
    """

    def __init__(self, name: str = "engine") -> None:
        self.client = _client()
        self.leader = jax.process_index() == 0
        self.num_followers = jax.process_count() - 1
        self.prefix = f"{_PREFIX}/{name}"
        self.n = 0
        self._ready = False
        self._stopped = False
        if self.leader:
            atexit.register(self.stop)

    @property
    def active(self) -> bool:
        return self.num_followers > 0

    def _wait_ready(self) -> None:
        # Every process has built its engine (weights, caches) before the first step runs: the
        # step's collectives would otherwise wait on a slower loader and time out.
        if not self._ready:
            self.client.wait_at_barrier(f"{self.prefix}/ready", _READY_TIMEOUT_MS)
            self._ready = True

    def agree_min(self, name: str, value: int) -> int:
        """Every process offers ``value``; all get the minimum (through the key-value store)."""
        me = jax.process_index()
        self.client.key_value_set(f"{self.prefix}/agree/{name}/{me}", str(int(value)))
        return min(int(self.client.blocking_key_value_get(
            f"{self.prefix}/agree/{name}/{i}", _READY_TIMEOUT_MS))
            for i in range(jax.process_count()))

    def share(self, msg: Any) -> Any:
        """Leader: publish this step's inputs. Followers: a no-op (they got ``msg`` from
        ``steps``). Returns ``msg``."""
        if self.leader and self.active:
            self._publish(_to_host(msg))
        return msg

    def _publish(self, msg: Any) -> None:
        self._wait_ready()
        self.client.key_value_set_bytes(f"{self.prefix}/{self.n}", pickle.dumps(msg, protocol=5))
        self.n += 1

    def stop(self) -> None:
        """Leader: tell the followers to return from ``steps()`` (idempotent)."""
        if self.leader and self.active and not self._stopped:
            self._stopped = True
            try:
                self._publish(None)
            except Exception as e:  # the coordinator may already be gone at interpreter exit
                log.debug("lockstep stop not delivered: %s", e)

    def steps(self) -> Iterator[Any]:
        """Follower: yield the leader's step messages in order until it stops."""
        if self.leader:
            raise RuntimeError("the leader does not follow")
        self._wait_ready()
        while True:
            key = f"{self.prefix}/{self.n}"
            try:
                data = self.client.blocking_key_value_get_bytes(key, _POLL_MS)
            except Exception as e:
                if "DEADLINE_EXCEEDED" in str(e):
                    continue  # the leader is idle
                raise
            self.n += 1
            if self.client.key_value_increment(f"{key}#reads", 1) == self.num_followers:
                self.client.key_value_delete(key)
                self.client.key_value_delete(f"{key}#reads")
            msg = pickle.loads(data)
            if msg is None:
                return
            yield msg
