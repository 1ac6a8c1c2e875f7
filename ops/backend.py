"""Single switch point: which attention implementation the model uses.

Who calls: the engine at start-up, ``get_attention_fn(args.attention_backend)``; it passes the
returned functions into the model (``models.layers.Attention``), which calls them inside its
jitted step. Both functions keep the reference signatures of ``ops.attention``:
``attention(q, k_cache, v_cache, page_table, kv_lens, cu_q_lens, *, sm_scale, sliding_window,
soft_cap)`` and ``write_kv(k_cache, v_cache, k, v, slot_mapping) -> (k_cache, v_cache)``.

Choices (``--attention-backend``):
- ``auto``: the Pallas kernel of the platform (``jax.default_backend()``: gpu -> Triton-lowered
  kernel, tpu -> Mosaic kernel), the pure-jnp reference elsewhere (CPU);
- ``reference``: the pure-jnp reference everywhere; on CPU with dimension-major key pages
  (``dim_major_keys``, faster on XLA:CPU; the two functions come as a pair and agree on it);
- ``pallas``: the platform's kernel, compiled; an error on a platform without one (CPU);
- ``pallas-interpret``: the platform's kernel in interpret mode (on CPU: the GPU kernel, whose
  interpret mode is the faster one); slow, for tests and debugging.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from ops import attention

log = logging.getLogger("xlaserve.ops")

BACKENDS = ("auto", "reference", "pallas", "pallas-interpret")


class AttentionBackend(NamedTuple):
    """What the model needs: the attention op, its KV-cache write, and a line for the logs."""

    attention: Callable[..., Any]
    write_kv: Callable[..., Any]
    description: str


def _kernel_module(platform: str) -> Any:
    # Imported lazily: the TPU/Triton Pallas modules are only needed when a kernel is chosen.
    if platform == "tpu":
        from ops import pallas_tpu

        return pallas_tpu
    from ops import pallas_gpu

    return pallas_gpu


def get_attention_fn(backend: str = "auto", platform: str | None = None) -> AttentionBackend:
    """Pick (attention, write_kv, description) for ``backend`` on ``platform`` (default:
    ``jax.default_backend()``) and log the choice. Raises ValueError for an unknown backend or
    ``pallas`` on a platform without a kernel."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    platform = platform or jax.default_backend()
    if backend == "auto":
        backend = "pallas" if platform in ("gpu", "tpu") else "reference"
    if backend == "reference":
        # On XLA:CPU the reference stores key pages dimension-major (ops.attention docstring).
        layout = platform == "cpu"
        chosen = AttentionBackend(
            functools.partial(attention.ragged_paged_attention_reference, dim_major_keys=layout),
            functools.partial(attention.write_kv, dim_major_keys=layout),
            f"reference (pure jnp{', dim-major key pages' if layout else ''}) on {platform}")
    elif backend == "pallas":
        if platform not in ("gpu", "tpu"):
            raise ValueError(
                f"attention backend 'pallas' needs a gpu or tpu, this platform is {platform!r} "
                "(use 'reference', or 'pallas-interpret' to run a kernel in interpret mode)")
        mod = _kernel_module(platform)
        lowering = "Mosaic TPU" if platform == "tpu" else "Triton"
        chosen = AttentionBackend(mod.ragged_paged_attention, mod.write_kv,
                                  f"pallas kernel ({lowering} lowering) on {platform}")
    else:  # pallas-interpret
        mod = _kernel_module(platform)
        lowering = "Mosaic TPU" if platform == "tpu" else "Triton"
        chosen = AttentionBackend(
            functools.partial(mod.ragged_paged_attention, interpret=True),
            functools.partial(mod.write_kv, interpret=True),
            f"pallas kernel ({lowering}) in interpret mode on {platform}")
    log.info("attention backend: %s", chosen.description)
    return chosen
