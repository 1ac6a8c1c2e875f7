"""Compilation facts from JAX itself: the persistent cache, and a counter of real compiles.

``CompileCounter`` listens to JAX's own monitoring events: a trace of a jitted function
(``/jax/core/compile/jaxpr_trace_duration``) and the creation of an XLA executable
(``/jax/core/compile/backend_compile_duration``, emitted whether the executable is compiled or
loaded from the persistent cache). Anything that makes JAX trace or compile while a counter is
watching on that thread counts: a jitted call with a new shape, dtype, weak type or sharding, an
eager ``jnp`` op on a new shape, a sampler variant that was not built ahead of time. The model
runner watches every step it executes, so ``num_recompiles`` is what JAX did, not what the runner
believes it compiled.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import jax

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
COUNTED_EVENTS = frozenset({TRACE_EVENT, COMPILE_EVENT})

_local = threading.local()
_listener_lock = threading.Lock()
_listening = False


def _on_event(event: str, duration_secs: float, **kwargs: str | int) -> None:
    counter = getattr(_local, "counter", None)
    if counter is not None and event in COUNTED_EVENTS:
        counter.events.append(event)


def _listen() -> None:
    """Register the one process-wide listener (JAX keeps listeners forever)."""
    global _listening
    with _listener_lock:
        if not _listening:
            jax.monitoring.register_event_duration_secs_listener(_on_event)
            _listening = True


class CompileCounter:
    """Counts JAX traces and executable builds on the watching thread."""

    def __init__(self) -> None:
        _listen()
        self.events: list[str] = []

    @property
    def count(self) -> int:
        return len(self.events)

    @contextlib.contextmanager
    def watching(self) -> Iterator[CompileCounter]:
        """Count what this thread makes JAX trace or compile inside the block."""
        outer = getattr(_local, "counter", None)
        _local.counter = self
        try:
            yield self
        finally:
            _local.counter = outer


def enable_compilation_cache(cache_root: str | None) -> str:
    """Point JAX's persistent compilation cache at ``<cache_root>/jax_compilation_cache`` (every
    executable is stored: start-up then loads instead of compiling)."""
    from models.assets import cache_dir
    path = os.path.join(str(cache_dir(cache_root)), "jax_compilation_cache")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
