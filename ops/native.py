"""Native CPU kernels (``ops/cpu/kernels.cc``) built with the host's C++ compiler and called
from jitted code through ``jax.ffi``.

Who calls: ``ops.backend`` (the ``native`` backend, and ``auto`` on CPU) and the tests.
``kernels()`` returns the kernels of this host's best ISA, or None when they cannot be had (not
x86-64 Linux with AVX2+FMA+F16C, no compiler, a failed build): the reason is logged once and the
caller keeps the pure-jnp reference path. ``load(isa)`` asks for one ISA and raises instead.

Build: one shared library per ISA (``avx2``: AVX2+FMA+F16C; ``avx512``: plus AVX-512
F/BW/VL/DQ), compiled from the one source with ``$CXX`` (default ``g++``) against the FFI
headers jaxlib ships (``jax.ffi.include_dir()``). The library is cached under
``<cache dir>/native/`` (``$XLASERVE_CACHE_DIR``, else ``~/.cache/xlaserve``), named by a hash of
the source, the flags, the compiler and jaxlib's version, so a stale one is never loaded; a
missing one is built on first use (about 10 s) or ahead of time by ``python -m ops.native``
(``scripts/setup.sh`` runs it). ``$XLASERVE_CPU_ISA`` (``avx2``, ``avx512`` or ``none``) overrides
the detection, e.g. to run the AVX2 path on an AVX-512 machine, or to turn native kernels off.

Contracts of the kernels (axis letters as in ``ops.attention``; M rows, K inputs, N outputs):
- ``linear(x f32[M, K], w) -> f32[M, N]``: ``x @ W`` with ``w = pack_linear(W)``, W ``[K, N]``
  stored as ``[N/16, K, 16]`` panels of f32 or f16 (f32 accumulate either way), or with
  ``w = pack_linear_q8(W)``, Q8_0 panels ``int8 [N/16, ceil(K/32), 576]`` (int8 weights and an
  f32 scale per 32 rows and column; computes ``x @ unpack_q8(w)``). N must be a multiple of 16
  (``packable``).
- ``ragged_paged_attention``: ``ops.attention.ragged_paged_attention_reference`` with
  ``dim_major_keys=True`` (the CPU cache layout): q f32, the cache f32 or f16
  (``KV_CACHE_DTYPES``; f16 is converted to f32 as it is loaded, F16C), scores, softmax and
  output f32.
- ``top_k(x f32[S, V], k) -> (f32[S, k], i32[S, k])``: ``jax.lax.top_k(x, k)`` bit for bit
  (values descending, ties by ascending index, -0.0 below 0.0, NaN ordered by its bits as XLA:CPU
  orders them), rows split over XLA's pool; the sampler's candidates.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ops import attention

log = logging.getLogger("xlaserve.ops")

SOURCE = Path(__file__).parent / "cpu" / "kernels.cc"
PANEL = 16  # output columns per packed weight panel (kernels.cc: kPanel)
MAX_GROUP, MAX_HEAD_DIM = 16, 512  # the attention kernel's limits (kernels.cc: PagedAttention)
ISAS = ("avx512", "avx2")  # best first
_ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl",
               "-mavx512dq"],
}
# /proc/cpuinfo flags each build needs.
_ISA_CPU_FLAGS = {
    "avx2": {"avx2", "fma", "f16c"},
    "avx512": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"},
}
_CXX_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fno-math-errno"]
WEIGHT_DTYPES = {"f32": jnp.float32, "f16": jnp.float16}
Q8_0 = "q8_0"  # the weight-only int8 format (``pack_linear_q8``)
WEIGHT_FORMATS = (*WEIGHT_DTYPES, Q8_0)  # --cpu-weight-dtype choices
# KV-cache dtypes the attention kernel reads, and its FFI target for each.
KV_CACHE_DTYPES = {jnp.dtype(jnp.float32): "paged_attention",
                   jnp.dtype(jnp.float16): "paged_attention_f16"}


class NativeUnavailable(RuntimeError):
    """The native kernels cannot run here; the message says why, in one line."""


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux), empty when unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def runnable_isas() -> list[str]:
    """The builds this CPU can run, best first."""
    flags = cpu_flags()
    return [isa for isa in ISAS if _ISA_CPU_FLAGS[isa] <= flags]


def host_isa() -> str:
    """The best build this CPU runs, honouring ``$XLASERVE_CPU_ISA``; raises NativeUnavailable."""
    forced = os.environ.get("XLASERVE_CPU_ISA", "").strip().lower()
    if forced == "none":
        raise NativeUnavailable("turned off by XLASERVE_CPU_ISA=none")
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise NativeUnavailable(f"no native kernels for {platform.system()}/{platform.machine()}")
    flags = cpu_flags()
    if forced:
        if forced not in ISAS:
            raise NativeUnavailable(f"XLASERVE_CPU_ISA={forced!r}: not one of {ISAS} or none")
        candidates: tuple[str, ...] = (forced,)
    else:
        candidates = ISAS
    for isa in candidates:
        if _ISA_CPU_FLAGS[isa] <= flags:
            return isa
    raise NativeUnavailable(f"this CPU lacks {' or '.join(candidates)} (needs "
                            f"{sorted(_ISA_CPU_FLAGS[candidates[-1]])})")


def _compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    path = shutil.which(cxx)
    if path is None:
        raise NativeUnavailable(f"no C++ compiler ({cxx!r} not found; set $CXX)")
    return path


def _cache_root(cache: str | os.PathLike[str] | None) -> Path:
    # The same location as models.assets.cache_dir; ops/ imports nothing above it (layering).
    if cache:
        return Path(cache).expanduser()
    env = os.environ.get("XLASERVE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "xlaserve"


def _library_path(isa: str, cxx: str, cache: str | os.PathLike[str] | None) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                             check=False).stdout.splitlines()[:1]
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(_CXX_FLAGS + _ISA_FLAGS[isa]).encode(),
                 repr(version).encode(), jax.ffi.include_dir().encode(),
                 jax.__version__.encode()):
        key.update(part)
        key.update(b"\0")
    return _cache_root(cache) / "native" / f"xlaserve-cpu-{isa}-{key.hexdigest()[:16]}.so"


def build(isa: str, cache: str | os.PathLike[str] | None = None) -> Path:
    """The cached library for ``isa``, compiled now if missing (raises NativeUnavailable)."""
    cxx = _compiler()
    path = _library_path(isa, cxx, cache)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Compiled to a temporary name and renamed: concurrent builders never load half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    cmd = [cxx, *_CXX_FLAGS, *_ISA_FLAGS[isa], "-isystem", jax.ffi.include_dir(), str(SOURCE),
           "-o", tmp]
    log.info("building native CPU kernels (%s): %s", isa, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        Path(tmp).unlink(missing_ok=True)  # g++ removes its output when it fails
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise NativeUnavailable(f"building {SOURCE.name} for {isa} failed: {last}")
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class NativeKernels:
    """The kernels of one ISA build, registered with XLA under ISA-specific target names (so
    that tests can run both builds in one process)."""

    isa: str
    path: Path

    def _target(self, name: str) -> str:
        return f"xlaserve_{self.isa}_{name}"

    def linear(self, x: jax.Array, w: jax.Array) -> jax.Array:
        """``x [M, K] @ W [K, N]`` with ``w = pack_linear(W)`` ``[N/16, K, 16]`` (f32 or f16) or
        ``w = pack_linear_q8(W)`` (int8); returns ``[M, N]`` in x's dtype (computed in f32)."""
        m = x.shape[0]
        n = w.shape[0] * PANEL
        name = {jnp.dtype(jnp.float16): "linear_f16",
                jnp.dtype(jnp.int8): "linear_q8"}.get(jnp.dtype(w.dtype), "linear_f32")
        if name == "linear_q8":
            n = w.shape[0] * PANEL
        y = jax.ffi.ffi_call(self._target(name), jax.ShapeDtypeStruct((m, n), jnp.float32))(
            x.astype(jnp.float32), w)
        return y.astype(x.dtype)

    def ragged_paged_attention(
        self,
        q: jax.Array,  # [T, N, H]
        k_cache: jax.Array,  # [K, P, B, H], each page dimension-major [H, B]
        v_cache: jax.Array,  # [K, P, B, H]
        page_table: jax.Array,  # i32[S, W]
        kv_lens: jax.Array,  # i32[S]
        cu_q_lens: jax.Array,  # i32[S + 1]
        *,
        sm_scale: float,
        sliding_window: int | None = None,
        soft_cap: float | None = None,
    ) -> jax.Array:  # [T, N, H]
        """``ops.attention.ragged_paged_attention_reference(..., dim_major_keys=True)``, the same
        contract (masking, zeros for padding, never a read outside the sequence's pages). A
        cache of a dtype not in ``KV_CACHE_DTYPES``, a q other than f32, more than
        ``MAX_GROUP`` query heads per kv head or a head dim over ``MAX_HEAD_DIM`` (the kernel's
        stack buffers) take the reference path."""
        group = q.shape[1] // k_cache.shape[0]
        target = KV_CACHE_DTYPES.get(jnp.dtype(k_cache.dtype))
        if target is None or v_cache.dtype != k_cache.dtype or q.dtype != jnp.float32 or \
                group > MAX_GROUP or q.shape[2] > MAX_HEAD_DIM:
            return attention.ragged_paged_attention_reference(
                q, k_cache, v_cache, page_table, kv_lens, cu_q_lens, sm_scale=sm_scale,
                sliding_window=sliding_window, soft_cap=soft_cap, dim_major_keys=True)
        return jax.ffi.ffi_call(self._target(target),
                                jax.ShapeDtypeStruct(q.shape, jnp.float32))(
            q, k_cache, v_cache, page_table.astype(jnp.int32), kv_lens.astype(jnp.int32),
            cu_q_lens.astype(jnp.int32), sm_scale=np.float32(sm_scale),
            window=np.int32(sliding_window or 0), soft_cap=np.float32(soft_cap or 0.0))


    def top_k(self, x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
        """``jax.lax.top_k(x, k)`` over the last axis of an f32 ``x [S, V]``, the same values
        and indices in the same order; other dtypes or ranks take ``lax.top_k``."""
        if x.dtype != jnp.float32 or x.ndim != 2 or not 1 <= k <= x.shape[1]:
            return jax.lax.top_k(x, k)
        s = x.shape[0]
        vals, ids = jax.ffi.ffi_call(
            self._target("top_k"), (jax.ShapeDtypeStruct((s, k), jnp.float32),
                                    jax.ShapeDtypeStruct((s, k), jnp.int32)))(x)
        return vals, ids


_HANDLERS = {"linear_f32": "XlaserveLinearF32", "linear_f16": "XlaserveLinearF16",
             "linear_q8": "XlaserveLinearQ8",
             "paged_attention": "XlaservePagedAttention",
             "paged_attention_f16": "XlaservePagedAttentionF16", "top_k": "XlaserveTopK"}


@functools.cache
def load(isa: str | None = None, cache: str | None = None) -> NativeKernels:
    """Build (if needed), load and register the kernels of ``isa`` (default: ``host_isa()``);
    raises NativeUnavailable. The CPU must run that ISA."""
    isa = isa or host_isa()
    if isa not in ISAS:
        raise NativeUnavailable(f"unknown ISA {isa!r}; one of {ISAS}")
    missing = _ISA_CPU_FLAGS[isa] - cpu_flags()
    if missing:
        raise NativeUnavailable(f"this CPU lacks {sorted(missing)} for the {isa} build")
    path = build(isa, cache)
    lib = ctypes.CDLL(str(path))
    lib.xlaserve_isa.restype = ctypes.c_char_p
    built_for = lib.xlaserve_isa().decode()
    if built_for != isa:
        raise NativeUnavailable(f"{path} was built for {built_for}, not {isa}")
    kernels = NativeKernels(isa, path)
    for name, symbol in _HANDLERS.items():
        jax.ffi.register_ffi_target(kernels._target(name), jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")
    return kernels


@functools.cache
def kernels() -> NativeKernels | None:
    """This host's kernels, or None (the reason logged once): the ``auto`` backend's question."""
    try:
        k = load()
    except (NativeUnavailable, OSError) as e:
        log.warning("native CPU kernels unavailable, using the pure-jnp reference path: %s", e)
        return None
    log.info("native CPU kernels: %s build (%s)", k.isa, k.path)
    return k


def packable(w: Any) -> bool:
    """Whether ``pack_linear`` takes a ``[K, N]`` weight: N a multiple of the panel width."""
    return len(np.shape(w)) == 2 and np.shape(w)[1] % PANEL == 0


def pack_linear(w: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """``W [K, N]`` as the kernels' panels ``[N/16, K, 16]`` of ``dtype`` (f32 or f16)."""
    k, n = w.shape
    if n % PANEL:
        raise ValueError(f"pack_linear: N={n} is not a multiple of {PANEL}")
    return jnp.asarray(w).reshape(k, n // PANEL, PANEL).transpose(1, 0, 2).astype(dtype)


def pack_rows(w: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """A ``[N, K]`` table used as ``x @ W.T`` (a tied embedding's LM head) as the kernels'
    panels ``[N/16, K, 16]``, without materialising the transpose first."""
    n, k = w.shape
    if n % PANEL:
        raise ValueError(f"pack_rows: N={n} is not a multiple of {PANEL}")
    return jnp.asarray(w).reshape(n // PANEL, PANEL, k).transpose(0, 2, 1).astype(dtype)


def packed_rows(w: jax.Array, ids: jax.Array) -> jax.Array:
    """Rows ``ids`` of the ``[N, K]`` table that ``pack_rows`` packed, as f32 ``[len(ids), K]``
    (the embedding lookup on a table packed for the LM head)."""
    return w[ids // PANEL, :, ids % PANEL].astype(jnp.float32)


# ---- Q8_0 packing (weight-only int8; kernels.cc: LinearQ8) ---------------------------------

Q8_ROWS = 32  # K rows per quantization block (kernels.cc: kQ8Rows)
Q8_BLOCK = Q8_ROWS * PANEL + PANEL * 4  # bytes per block: int8 weights, then f32 scales


def pack_linear_q8(w: jax.Array) -> jax.Array:
    """``W [K, N]`` as Q8_0 panels ``int8 [N/16, ceil(K/32), 576]``: per panel of 16 columns and
    block of 32 rows, the weights ``round(W / s)`` in [-127, 127] (``[32, 16]``, K-major; rows
    past K are 0) then the 16 scales ``s = max|W| / 127`` as f32 bytes (0 for an all-zero
    column block). ``unpack_q8`` inverts it up to the rounding (at most s/2 per weight)."""
    k, n = w.shape
    if n % PANEL:
        raise ValueError(f"pack_linear_q8: N={n} is not a multiple of {PANEL}")
    blocks = -(-k // Q8_ROWS)
    w = jnp.pad(jnp.asarray(w, jnp.float32), ((0, blocks * Q8_ROWS - k), (0, 0)))
    w = w.reshape(blocks, Q8_ROWS, n // PANEL, PANEL).transpose(2, 0, 1, 3)  # [P, B, 32, 16]
    scale = jnp.max(jnp.abs(w), axis=2) / 127.0  # [P, B, 16]
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(w / safe[:, :, None, :]), -127, 127).astype(jnp.int8)
    scale_bytes = jax.lax.bitcast_convert_type(scale, jnp.int8)  # [P, B, 16, 4]
    return jnp.concatenate([q.reshape(n // PANEL, blocks, Q8_ROWS * PANEL),
                            scale_bytes.reshape(n // PANEL, blocks, PANEL * 4)], axis=2)


def unpack_q8(packed: jax.Array, k: int) -> jax.Array:
    """The f32 ``W [k, N]`` that ``pack_linear_q8`` panels encode (the kernel's exact weights)."""
    p, blocks, _ = packed.shape
    q = packed[:, :, : Q8_ROWS * PANEL].reshape(p, blocks, Q8_ROWS, PANEL).astype(jnp.float32)
    scale = jax.lax.bitcast_convert_type(
        packed[:, :, Q8_ROWS * PANEL:].reshape(p, blocks, PANEL, 4), jnp.float32)
    w = (q * scale[:, :, None, :]).transpose(1, 2, 0, 3).reshape(blocks * Q8_ROWS, p * PANEL)
    return w[:k]


def pack_rows_q8(w: jax.Array) -> jax.Array:
    """A ``[N, K]`` table used as ``x @ W.T`` (a tied embedding's LM head) as Q8_0 panels:
    ``pack_linear_q8`` of ``W.T``."""
    return pack_linear_q8(jnp.asarray(w).T)


def packed_rows_q8(w: jax.Array, ids: jax.Array) -> jax.Array:
    """Rows ``ids`` of the ``[N, K]`` table that ``pack_rows_q8`` packed, dequantized to f32
    ``[len(ids), ceil(K/32) * 32]`` (zeros past K: the caller keeps its first K columns),
    gathering only those rows' bytes (the embedding lookup on a table packed for the LM head)."""
    panel, col = (ids // PANEL)[:, None, None], (ids % PANEL)[:, None, None]
    blocks = jnp.arange(w.shape[1])[None, :, None]
    q = w[panel, blocks, jnp.arange(Q8_ROWS)[None, None, :] * PANEL + col]  # [n, B, 32]
    scale_bytes = w[panel, blocks, Q8_ROWS * PANEL + col * 4 + jnp.arange(4)[None, None, :]]
    scale = jax.lax.bitcast_convert_type(scale_bytes, jnp.float32)  # [n, B]
    return (q.astype(jnp.float32) * scale[:, :, None]).reshape(ids.shape[0], -1)


def main() -> None:
    """``python -m ops.native``: build (or find) this host's library, as ``scripts/setup.sh``
    does; ``--isa all`` builds every ISA this CPU runs. Never fails the set-up: a missing
    compiler is reported and the server will use the reference path."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--isa", default=None, help="avx2, avx512, all (default: this host's best)")
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args()
    isas = runnable_isas() if args.isa == "all" else [args.isa]
    for isa in isas:
        try:
            path = build(isa or host_isa(), args.cache_dir)
            print(f"native CPU kernels ({isa or 'host'}): {path}")
        except NativeUnavailable as e:
            print(f"native CPU kernels not built, the server will use the reference path: {e}")


if __name__ == "__main__":
    main()
