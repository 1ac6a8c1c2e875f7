"""Single switch point: which attention implementation the model uses.

Who calls: the engine at start-up, ``get_attention_fn(args.attention_backend)``; it passes the
returned functions into the model (``models.layers.Attention``), which calls them inside its
jitted step. Both functions keep the reference signatures of ``ops.attention``:
``attention(q, k_cache, v_cache, page_table, kv_lens, cu_q_lens, *, sm_scale, sliding_window,
soft_cap)`` and ``write_kv(k_cache, v_cache, k, v, slot_mapping) -> (k_cache, v_cache)``.

Choices (``--attention-backend``):
- ``auto``: the Pallas kernel of the platform (``jax.default_backend()``: gpu -> Triton-lowered
  kernel, tpu -> Mosaic kernel); on CPU the native kernels (``native``) when this host has them
  (``ops.native.kernels()``; else the reason is logged once and the reference runs);
- ``native``: the native CPU kernels (``ops.native``: C++ through ``jax.ffi``): the attention
  here, and ``get_linear_fn`` hands out the packed-weight GEMM for the projections and the LM
  head; an error where they cannot run (not a CPU, no compiler, no AVX2);
- ``reference``: the pure-jnp reference everywhere; on CPU with dimension-major key pages
  (``dim_major_keys``, faster on XLA:CPU; the two functions come as a pair and agree on it);
- ``pallas``: the platform's kernel, compiled; an error on a platform without one (CPU);
- ``pallas-interpret``: the platform's kernel in interpret mode (on CPU: the GPU kernel, whose
  interpret mode is the faster one); slow, for tests and debugging.

KV-cache dtype (``--kv-cache-dtype``): every backend writes through its ``write_kv``, which casts
to the cache's dtype, and computes attention in f32. ``check_kv_cache_dtype`` says which
explicitly requested cache dtypes each backend runs: the reference any; the native kernels f32
and f16 (``ops.native.KV_CACHE_DTYPES``); the Pallas kernels only the model's own dtype (their
dots take q and the cache in one dtype).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ops import attention, native

log = logging.getLogger("xlaserve.ops")

BACKENDS = ("auto", "reference", "pallas", "pallas-interpret", "native")


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


def _resolve(backend: str, platform: str) -> str:
    """``auto`` made concrete for ``platform``."""
    if backend != "auto":
        return backend
    if platform in ("gpu", "tpu"):
        return "pallas"
    return "native" if platform == "cpu" and native.kernels() is not None else "reference"


def _native_kernels(platform: str) -> native.NativeKernels:
    if platform != "cpu":
        raise ValueError(f"the native backend runs on a CPU, this platform is {platform!r}")
    try:
        return native.load()
    except native.NativeUnavailable as e:
        raise ValueError(f"native CPU kernels unavailable: {e} (use --attention-backend "
                         "reference)") from None


def check_kv_cache_dtype(backend: str, kv_dtype: Any, model_dtype: Any,
                         platform: str | None = None) -> None:
    """Raise ValueError, naming the way out, when ``backend`` (as ``get_attention_fn`` resolves
    it on ``platform``) cannot run a KV cache of ``kv_dtype`` that the user asked for beside a
    model of ``model_dtype``. For an explicit ``--kv-cache-dtype`` only: the default cache
    follows the model, which every backend runs."""
    platform = platform or jax.default_backend()
    resolved = _resolve(backend, platform) if backend in BACKENDS else backend
    kv, model = jnp.dtype(kv_dtype), jnp.dtype(model_dtype)
    if resolved == "native" and kv not in native.KV_CACHE_DTYPES:
        supported = ", ".join(sorted(d.name for d in native.KV_CACHE_DTYPES))
        raise ValueError(
            f"the native CPU attention kernel reads a {supported} KV cache, not {kv.name} "
            f"(attention backend {backend!r}); use --kv-cache-dtype float16 or float32, or "
            "--attention-backend reference")
    if resolved in ("pallas", "pallas-interpret") and kv != model:
        raise ValueError(
            f"the Pallas attention kernels need the KV cache in the model's dtype ({model.name}), "
            f"got --kv-cache-dtype {kv.name}; use --kv-cache-dtype auto, or --dtype {kv.name}")


class LinearBackend(NamedTuple):
    """The projections' and LM head's matmul and the packing of its weights (``ops.native``):
    ``linear(x [M, K], pack(W [K, N])) -> [M, N]``; ``pack_rows`` packs an ``[N, K]`` table
    used as ``x @ W.T`` and ``rows(packed, ids)`` reads rows back (a tied embedding)."""

    linear: Callable[..., Any]
    pack: Callable[[Any], Any]
    pack_rows: Callable[[Any], Any]
    rows: Callable[[Any, Any], Any]
    description: str


def get_linear_fn(backend: str = "auto", weight_dtype: str = "f16",
                  platform: str | None = None) -> LinearBackend | None:
    """The packed-weight GEMM of ``backend`` (``native``, or ``auto`` where it resolves to it),
    weights stored as ``weight_dtype`` (``f16``, ``f32`` or ``q8_0``: int8 with a scale per 32
    rows; f32 accumulate in every case); None for
    the other backends, whose models keep their einsums. Raises ValueError like
    ``get_attention_fn``."""
    if weight_dtype not in native.WEIGHT_FORMATS:
        raise ValueError(f"CPU weight dtype must be one of {native.WEIGHT_FORMATS}, got "
                         f"{weight_dtype!r}")
    platform = platform or jax.default_backend()
    if backend not in BACKENDS or _resolve(backend, platform) != "native":
        return None
    kernels = _native_kernels(platform)
    description = f"native CPU GEMM ({kernels.isa}, {weight_dtype} weights, f32 accumulate)"
    if weight_dtype == native.Q8_0:
        chosen = LinearBackend(kernels.linear, native.pack_linear_q8, native.pack_rows_q8,
                               native.packed_rows_q8, description)
    else:
        dtype = native.WEIGHT_DTYPES[weight_dtype]
        chosen = LinearBackend(
            kernels.linear, functools.partial(native.pack_linear, dtype=dtype),
            functools.partial(native.pack_rows, dtype=dtype), native.packed_rows, description)
    log.info("linear backend: %s", chosen.description)
    return chosen


def get_top_k_fn(backend: str = "auto", platform: str | None = None
                  ) -> Callable[[jax.Array, int], tuple[jax.Array, jax.Array]] | None:
    """The sampler's top-k for ``backend``: the native kernel (``ops.native``: ``lax.top_k``'s
    exact results, faster) where ``backend`` resolves to ``native``, else None (``lax.top_k``).
    Raises ValueError like ``get_attention_fn``."""
    platform = platform or jax.default_backend()
    if backend not in BACKENDS or _resolve(backend, platform) != "native":
        return None
    return _native_kernels(platform).top_k


def get_attention_fn(backend: str = "auto", platform: str | None = None) -> AttentionBackend:
    """Pick (attention, write_kv, description) for ``backend`` on ``platform`` (default:
    ``jax.default_backend()``) and log the choice. Raises ValueError for an unknown backend or
    ``pallas`` on a platform without a kernel."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    platform = platform or jax.default_backend()
    backend = _resolve(backend, platform)
    if backend == "native":
        kernels = _native_kernels(platform)
        chosen = AttentionBackend(
            kernels.ragged_paged_attention,
            functools.partial(attention.write_kv, dim_major_keys=True),
            f"native CPU kernel ({kernels.isa}, dim-major key pages) on {platform}")
    elif backend == "reference":
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
