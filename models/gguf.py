"""GGUF model source: a llama.cpp ``.gguf`` file as HF-style config, tokenizer and f32 tensors.

Called by the model loader (``models.loader``) when a model spec names a ``.gguf`` file or a
directory holding exactly one. ``load_gguf`` reads only the file's header (metadata and tensor
directory) and builds the tokenizer; tensor data stays in the file until the caller iterates
``GGUFModel.tensors()``, which dequantizes one tensor at a time, so peak memory stays near the size
of the final float32 weights plus one tensor.

Contract of the output, shared with the HF-directory source:
- ``hf_config`` is a transformers-style ``config.json`` dict (``model_type`` "llama", "qwen2",
  "qwen3" or "gemma3_text"). Both the flat rope keys (``rope_theta``, ``rope_scaling``,
  ``rope_local_base_freq``) and transformers 5's ``rope_parameters`` are filled in.
- ``tensors()`` yields HF parameter names with float32 numpy arrays in HF layout: linears are
  ``[out, in]`` (the reverse of GGUF's dimension list, which is what numpy order gives), Q/K rows
  are in HF's half-split rope order (llama.cpp's interleave undone), and Gemma norms are the HF
  weights (llama.cpp's stored ``w + 1`` undone).

We parse the header ourselves rather than with ``gguf.GGUFReader``: the reader wraps every
vocabulary string in numpy views, which costs 3 s for SmolLM2's 49k tokens and 20 s for Gemma 3's
262k; a plain ``struct`` walk over the same bytes takes a fraction of a second. Dequantization is
``gguf.quants.dequantize``.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import re
import struct
import sys
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize
from tqdm import tqdm

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


class GGUFError(ValueError):
    """A GGUF file cannot be used; the message is one line, fit to show a user as is."""


# --------------------------------------------------------------------------------------------
# Header parsing
# --------------------------------------------------------------------------------------------

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
_SUPPORTED_VERSIONS = (2, 3)  # v1 counted with 32-bit integers; no file in use still has it

# GGUF metadata value types (gguf.GGUFValueType) for the fixed-width scalars: struct format.
_SCALAR_FORMATS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
    10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip
_SCALAR_DTYPES = {
    0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
    6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64,
}  # fmt: skip
_STRING, _ARRAY = 8, 9

# What ``tensors()`` can dequantize. Others exist in gguf-py, but these are the ones this project
# tests; an unknown type fails at load time rather than halfway through the weights.
SUPPORTED_QUANT_TYPES: tuple[GGMLQuantizationType, ...] = (
    GGMLQuantizationType.F32,
    GGMLQuantizationType.F16,
    GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.Q4_K,
    GGMLQuantizationType.Q5_0,
    GGMLQuantizationType.Q5_K,
    GGMLQuantizationType.Q6_K,
)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in the GGUF tensor directory.

    ``shape`` is in numpy order (GGUF lists the innermost dimension first; we reverse it), so a
    linear weight reads ``[out, in]``. ``offset`` is absolute in the file.
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        try:
            return GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return f"unknown type {self.ggml_type}"


@dataclass(frozen=True)
class GGUFHeader:
    """Everything in a GGUF file except the tensor data.

    ``metadata`` maps keys to Python values: ints, floats, bools, strs, and lists for arrays.
    ``header_sha256`` hashes the bytes of the fixed header and the metadata section; it identifies
    the tokenizer a file describes (used as the tokenizer cache key).
    """

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    data_offset: int
    file_size: int
    header_sha256: str


class _Cursor:
    """Bounds-checked little-endian reads over the mapped file; any overrun is a GGUFError."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.size = len(buf)
        self.path = path

    def _need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(
                f"{self.path} is truncated or corrupt: its header runs past the end of the file "
                f"(byte {self.pos} + {n} > {self.size})"
            )

    def scalar(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        self._need(n)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        self._need(n)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            # A few vocabularies carry a malformed token; keep the rest of the file usable.
            return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = self.scalar("<I")
            count = self.scalar("<Q")
            if etype in _SCALAR_DTYPES:
                dtype = np.dtype(_SCALAR_DTYPES[etype])
                self._need(count * dtype.itemsize)
                arr = np.frombuffer(self.buf, dtype=dtype.newbyteorder("<"), count=count,
                                    offset=self.pos)  # fmt: skip
                self.pos += count * dtype.itemsize
                return arr.tolist()
            if etype == _STRING:
                self._need(count * 8)  # every string has at least its 8-byte length
                return [self.string() for _ in range(count)]
            if etype == _ARRAY:
                self._need(count * 12)
                return [self.value(_ARRAY) for _ in range(count)]
            raise GGUFError(f"{self.path} is corrupt: unknown metadata array type {etype}")
        raise GGUFError(f"{self.path} is corrupt: unknown metadata value type {vtype}")


def read_header(path: str | Path) -> GGUFHeader:
    """Parse the header and tensor directory of the GGUF file at ``path`` (a file, not a directory).

    Raises GGUFError if the file is not GGUF, is a version we do not read, is big-endian, or is
    truncated/corrupt (including tensor data that would extend past the end of the file).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise GGUFError(f"cannot read {path}: {e.strerror or e}") from e
    if size < 24:
        raise GGUFError(f"{path} is not a GGUF file (only {size} bytes)")
    with _mapped(path) as buf:
        return _parse(buf, path, size)


@contextmanager
def _mapped(path: Path) -> Iterator[mmap.mmap]:
    """The file mapped read-only; OS errors become GGUFError. Pages are file-backed, so mapping
    a large file costs address space, not memory."""
    try:
        f = open(path, "rb")  # noqa: SIM115 -- closed by the with below
    except OSError as e:
        raise GGUFError(f"cannot read {path}: {e.strerror or e}") from e
    with f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:  # ValueError: an empty file
            raise GGUFError(f"cannot read {path}: {e}") from e
        with buf:
            yield buf


def _parse(buf: mmap.mmap, path: Path, size: int) -> GGUFHeader:
    cur = _Cursor(buf, path)
    if buf[:4] != _MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    cur.pos = 4
    version = cur.scalar("<I")
    if version not in _SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0:
            raise GGUFError(f"{path} is a big-endian GGUF file, which xlaserve does not read")
        raise GGUFError(f"{path} has GGUF version {version}; xlaserve reads versions 2 and 3")
    n_tensors = cur.scalar("<Q")
    n_kv = cur.scalar("<Q")
    # Each KV entry and each tensor entry takes well over 8 bytes; absurd counts mean corruption.
    if n_tensors * 8 > size or n_kv * 8 > size:
        raise GGUFError(f"{path} is corrupt: implausible counts ({n_tensors} tensors, {n_kv} keys)")

    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("<I"))
    kv_end = cur.pos

    infos: list[tuple[str, tuple[int, ...], int, int]] = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.scalar("<I")
        if n_dims > 8:
            raise GGUFError(f"{path} is corrupt: tensor {name!r} claims {n_dims} dimensions")
        dims = tuple(cur.scalar("<Q") for _ in range(n_dims))
        ggml_type = cur.scalar("<I")
        rel_offset = cur.scalar("<Q")
        infos.append((name, tuple(reversed(dims)), ggml_type, rel_offset))

    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{path} is corrupt: general.alignment {alignment!r} is not a power of two")
    data_offset = -(-cur.pos // alignment) * alignment

    tensors = []
    for name, shape, ggml_type, rel_offset in infos:
        nbytes = _tensor_nbytes(shape, ggml_type)
        start = data_offset + rel_offset
        if nbytes is not None and start + nbytes > size:
            raise GGUFError(
                f"{path} is truncated or corrupt: tensor {name!r} ends at byte {start + nbytes} "
                f"but the file has {size} bytes"
            )
        tensors.append(TensorInfo(name, shape, ggml_type, start, nbytes or 0))

    header_sha = hashlib.sha256(buf[:kv_end]).hexdigest()
    return GGUFHeader(path, version, metadata, tuple(tensors), data_offset, size, header_sha)


def _tensor_nbytes(shape: tuple[int, ...], ggml_type: int) -> int | None:
    """Bytes a tensor occupies, or None for a type gguf-py does not know (reported later)."""
    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except ValueError:
        return None
    n = math.prod(shape)
    return n // block * type_size


# --------------------------------------------------------------------------------------------
# Architectures: GGUF metadata -> HF config, GGUF tensor names -> HF names
# --------------------------------------------------------------------------------------------

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensors llama.cpp adds that have no HF parameter. rope_freqs holds llama3 rope scaling factors,
# which we turn back into the config's rope_scaling instead.
_IGNORED_NAMES = {"rope_freqs.weight"}

_LAYER_COMMON = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
}
_LAYER_LLAMA = _LAYER_COMMON | {"ffn_norm": "post_attention_layernorm"}
_LAYER_GEMMA3 = _LAYER_COMMON | {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")


@dataclass(frozen=True)
class _Arch:
    model_type: str
    hf_class: str
    layer_names: dict[str, str]
    # llama.cpp interleaves Q/K rows for archs it runs with "normal" (pairwise) rope.
    permuted_qk: bool
    # llama.cpp stores Gemma RMSNorm weights as w + 1 (Gemma computes x * (1 + w)).
    norm_shift: float


_ARCHS = {
    "llama": _Arch("llama", "LlamaForCausalLM", _LAYER_LLAMA, permuted_qk=True, norm_shift=0.0),
    "qwen2": _Arch("qwen2", "Qwen2ForCausalLM", _LAYER_LLAMA, permuted_qk=False, norm_shift=0.0),
    "qwen3": _Arch("qwen3", "Qwen3ForCausalLM", _LAYER_LLAMA, permuted_qk=False, norm_shift=0.0),
    "gemma3": _Arch(
        "gemma3_text", "Gemma3ForCausalLM", _LAYER_GEMMA3, permuted_qk=False, norm_shift=1.0
    ),
}
SUPPORTED_ARCHITECTURES = tuple(sorted(_ARCHS))


def _hf_name(arch: _Arch, gguf_name: str) -> str | None:
    """HF parameter name for a GGUF tensor name, or None if the name is unknown."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if m is None or m.group(2) not in arch.layer_names:
        return None
    return f"model.layers.{m.group(1)}.{arch.layer_names[m.group(2)]}.{m.group(3)}"


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rope row permutation of a Q or K weight (or bias).

    llama.cpp reorders each head's rows from HF's half-split rope layout ``[x0..x(d/2-1) |
    x(d/2)..x(d-1)]`` into interleaved pairs; per head the rows of GGUF are ``(pair j, half h)`` and
    HF wants ``(half h, pair j)``. ``n_head`` is num_attention_heads for Q and
    num_key_value_heads for K.
    """
    rows = w.shape[0]
    half = rows // n_head // 2
    return np.ascontiguousarray(
        w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation (HF half-split -> interleaved pairs); the inverse of the above.

    Exposed for tests and for writers of GGUF files.
    """
    rows = w.shape[0]
    half = rows // n_head // 2
    return np.ascontiguousarray(
        w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


@dataclass
class GGUFModel:
    """A GGUF checkpoint, ready for the Flax model builder.

    Built by ``load_gguf``. ``tensors()`` may be called more than once; each call re-reads the file.
    """

    path: Path
    hf_config: dict[str, Any]
    tokenizer: PreTrainedTokenizerFast
    generation_config: dict[str, Any]
    header: GGUFHeader = field(repr=False)
    _arch: _Arch = field(repr=False)

    @property
    def num_tensors(self) -> int:
        """How many tensors ``tensors()`` yields."""
        return sum(1 for t in self.header.tensors if t.name not in _IGNORED_NAMES)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF name -> shape for every tensor ``tensors()`` yields, without reading any data."""
        return {
            name: info.shape
            for info in self.header.tensors
            if (name := _hf_name(self._arch, info.name)) is not None
        }

    def tensors(
        self, progress: bool = True, only: Collection[str] | None = None
    ) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(hf_name, float32 array)`` for every weight, in file order, one at a time.

        Each array is freshly allocated, C-contiguous and writeable (it does not alias the
        file). Progress goes to stderr through tqdm unless ``progress`` is False. ``only``
        restricts the output to these HF names (for tests and inspection).
        """
        cfg = self.hf_config
        n_q, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        infos = [
            t
            for t in self.header.tensors
            if t.name not in _IGNORED_NAMES
            and (only is None or _hf_name(self._arch, t.name) in only)
        ]
        with _mapped(self.path) as buf:
            if len(buf) != self.header.file_size:
                raise GGUFError(f"{self.path} changed on disk since it was loaded")
            bar = tqdm(
                infos, desc="dequantizing GGUF", unit="tensor", file=sys.stderr,
                disable=not progress, leave=False,
            )  # fmt: skip
            for info in bar:
                hf_name = _hf_name(self._arch, info.name)
                assert hf_name is not None  # checked in load_gguf
                w = _dequantize(buf, info)
                if self._arch.permuted_qk and ".attn_q." in info.name:
                    w = _unpermute_rows(w, n_q)
                elif self._arch.permuted_qk and ".attn_k." in info.name:
                    w = _unpermute_rows(w, n_kv)
                if self._arch.norm_shift and info.name.endswith("norm.weight"):
                    w = w - np.float32(self._arch.norm_shift)
                yield hf_name, w


def _dequantize(buf: mmap.mmap, info: TensorInfo) -> np.ndarray:
    qtype = GGMLQuantizationType(info.ggml_type)
    block, type_size = GGML_QUANT_SIZES[qtype]
    cols = info.shape[-1] if info.shape else 1
    rows = info.nbytes // (cols // block * type_size)
    raw = np.frombuffer(buf, dtype=np.uint8, count=info.nbytes, offset=info.offset)
    out = dequantize(raw.reshape(rows, cols // block * type_size), qtype)
    out = out.reshape(info.shape)
    if not out.flags.writeable or not out.flags.c_contiguous or out.dtype != np.float32:
        # F32 tensors come back as a view of the read-only mapping.
        out = np.array(out, dtype=np.float32, order="C")
    return out


def find_gguf_file(path: str | Path) -> Path:
    """The .gguf file ``path`` names: the file itself, or the single .gguf in a directory."""
    p = Path(path).expanduser()
    if not p.exists():
        raise GGUFError(f"GGUF path not found: {p}")
    if p.is_dir():
        found = sorted(q for q in p.iterdir() if q.suffix.lower() == ".gguf" and q.is_file())
        if not found:
            raise GGUFError(f"no .gguf file in directory {p}")
        if len(found) > 1:
            names = ", ".join(q.name for q in found)
            raise GGUFError(
                f"directory {p} holds {len(found)} .gguf files ({names}); pass one file"
            )
        return found[0]
    return p


def load_gguf_config(path: str | Path) -> dict[str, Any]:
    """Just the HF config of a GGUF checkpoint (no tokenizer); same checks as ``load_gguf``."""
    file = find_gguf_file(path)
    header = read_header(file)
    arch_name, arch = _arch_of(file, header)
    _check_tensors(file, arch, header)
    return _build_config(file, arch_name, arch, header)


def _arch_of(file: Path, header: GGUFHeader) -> tuple[str, _Arch]:
    arch_name = header.metadata.get("general.architecture")
    if not isinstance(arch_name, str):
        raise GGUFError(f"{file} is corrupt: it has no general.architecture")
    arch = _ARCHS.get(arch_name)
    if arch is None:
        raise GGUFError(
            f"unsupported GGUF architecture {arch_name!r} in {file}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch_name, arch


def load_gguf(
    path: str | Path, *, tokenizer_cache: bool = True, progress: bool = True
) -> GGUFModel:
    """Open a GGUF checkpoint: parse its header, build config and tokenizer, check its tensors.

    ``path`` is a .gguf file or a directory holding exactly one. No tensor data is read here
    (except llama3 rope factors); iterate ``tensors()`` for the weights. Every problem a user can
    cause (missing path, not GGUF, truncated, unsupported architecture or quantization type,
    tensors that do not match the config) raises GGUFError with a one-line message.
    ``tokenizer_cache`` reuses a tokenizer built before from an identical header (see
    ``models.tokenizer``).
    """
    from models.tokenizer import tokenizer_from_gguf

    file = find_gguf_file(path)
    header = read_header(file)
    meta = header.metadata
    arch_name, arch = _arch_of(file, header)
    _check_tensors(file, arch, header)
    hf_config = _build_config(file, arch_name, arch, header)
    tokenizer = tokenizer_from_gguf(
        meta, cache_key=header.header_sha256 if tokenizer_cache else None, progress=progress
    )
    gen = _generation_config(meta, hf_config, tokenizer)
    return GGUFModel(file, hf_config, tokenizer, gen, header, arch)


def _check_tensors(file: Path, arch: _Arch, header: GGUFHeader) -> None:
    supported = set(SUPPORTED_QUANT_TYPES)
    for info in header.tensors:
        if info.name in _IGNORED_NAMES:
            continue
        if _hf_name(arch, info.name) is None:
            raise GGUFError(
                f"{file} has tensor {info.name!r}, which xlaserve does not know for "
                f"architecture {header.metadata['general.architecture']!r}"
            )
        if info.ggml_type not in supported:
            raise GGUFError(
                f"tensor {info.name!r} in {file} uses quantization type {info.type_name}, which "
                f"xlaserve cannot dequantize; supported: "
                f"{', '.join(t.name for t in SUPPORTED_QUANT_TYPES)}"
            )
        block = GGML_QUANT_SIZES[GGMLQuantizationType(info.ggml_type)][0]
        if not info.shape or info.shape[-1] % block:
            raise GGUFError(
                f"{file} is corrupt: tensor {info.name!r} has shape {info.shape}, "
                f"not a whole number of {info.type_name} blocks"
            )


def _build_config(file: Path, arch_name: str, arch: _Arch, header: GGUFHeader) -> dict[str, Any]:
    meta = header.metadata
    shapes = {t.name: t.shape for t in header.tensors}

    def key(name: str, default: Any = None, required: bool = False) -> Any:
        full = f"{arch_name}.{name}"
        if full not in meta:
            if required:
                raise GGUFError(f"{file} is missing metadata key {full}")
            return default
        return meta[full]

    n_layers = key("block_count", required=True)
    hidden = key("embedding_length", required=True)
    n_heads = key("attention.head_count", required=True)
    n_kv = key("attention.head_count_kv", n_heads)
    if isinstance(n_heads, list) or isinstance(n_kv, list):
        # Per-layer head counts (e.g. OpenELM); none of our families do this.
        raise GGUFError(f"{file} has per-layer head counts, which xlaserve does not support")
    head_dim = key("attention.key_length") or key("rope.dimension_count") or hidden // n_heads
    if "token_embd.weight" not in shapes:
        raise GGUFError(f"{file} has no token_embd.weight tensor")
    vocab_size = shapes["token_embd.weight"][0]
    intermediate = key("feed_forward_length")
    if intermediate is None and "blk.0.ffn_up.weight" in shapes:
        intermediate = shapes["blk.0.ffn_up.weight"][0]
    rope_theta = _f32(key("rope.freq_base", 10000.0))
    tied = "output.weight" not in shapes
    attention_bias = "blk.0.attn_q.bias" in shapes

    # Shapes must agree with the config, or the model would fail obscurely later.
    expected = {
        "blk.0.attn_q.weight": (n_heads * head_dim, hidden),
        "blk.0.attn_k.weight": (n_kv * head_dim, hidden),
        "blk.0.attn_v.weight": (n_kv * head_dim, hidden),
    }
    for name, shape in expected.items():
        if name not in shapes:
            raise GGUFError(f"{file} has no {name} tensor")
        if shapes[name] != shape:
            raise GGUFError(
                f"{file} is inconsistent: {name} has shape {shapes[name]}, metadata implies {shape}"
            )
    missing = [
        f"blk.{i}.{part}.weight"
        for i in range(n_layers)
        for part in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_down", "attn_norm")
        if f"blk.{i}.{part}.weight" not in shapes
    ]
    if missing:
        raise GGUFError(f"{file} is incomplete: {len(missing)} layer tensors missing, e.g. "
                        f"{missing[0]}")  # fmt: skip

    cfg: dict[str, Any] = {
        "model_type": arch.model_type,
        "architectures": [arch.hf_class],
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": key("context_length", 2048),
        "rms_norm_eps": _f32(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": rope_theta,
        "rope_scaling": None,
        "attention_bias": attention_bias,
        "tie_word_embeddings": tied,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    scaling = _rope_scaling(file, arch_name, meta, header, head_dim, rope_theta)

    if arch_name == "gemma3":
        cfg["hidden_activation"] = "gelu_pytorch_tanh"
        sliding_window = key("attention.sliding_window")
        pattern_meta = key("attention.sliding_window_pattern")
        if isinstance(pattern_meta, list):  # one bool per layer, True = sliding (llama.cpp swa)
            sliding = [bool(x) for x in pattern_meta]
            pattern = None
        else:
            # llama.cpp hard-codes Gemma 3's pattern: 5 sliding layers, then 1 global.
            pattern = int(pattern_meta) if pattern_meta else 6
            sliding = [(i + 1) % pattern != 0 for i in range(n_layers)]
        cfg["sliding_window"] = sliding_window
        cfg["sliding_window_pattern"] = pattern
        cfg["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
        # Gemma 3 runs local layers at base 10k and global ones at freq_base (1M), which is the
        # only base the file states; 10k is fixed for the family (llama.cpp hard-codes it too).
        cfg["rope_local_base_freq"] = 10000.0
        # llama.cpp scales queries by 1/sqrt(head_dim), except for the 27B (62 layers), which
        # uses hidden/heads; HF expresses this as query_pre_attn_scalar.
        cfg["query_pre_attn_scalar"] = hidden // n_heads if n_layers == 62 else head_dim
        cfg["final_logit_softcapping"] = key("final_logit_softcapping")
        cfg["attn_logit_softcapping"] = key("attn_logit_softcapping")
        cfg["use_qk_norm"] = True
        cfg["rope_scaling"] = scaling  # applies to the global layers only
        cfg["rope_parameters"] = {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": rope_theta} | (scaling or {}),
        }
    else:
        cfg["hidden_act"] = "silu"
        cfg["mlp_bias"] = False
        cfg["rope_scaling"] = scaling
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta} | (
            scaling or {}
        )
        cfg["use_qk_norm"] = "blk.0.attn_q_norm.weight" in shapes
        if arch_name == "qwen3" and not cfg["use_qk_norm"]:
            raise GGUFError(f"{file} is a qwen3 model without attn_q_norm tensors")
    return cfg


def _f32(x: float) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (1e-05, not 9.99e-06),
    which is how HF config.json files spell the same number."""
    return float(str(np.float32(x)))


def _rope_scaling(
    file: Path,
    arch_name: str,
    meta: dict[str, Any],
    header: GGUFHeader,
    head_dim: int,
    rope_theta: float,
) -> dict[str, Any] | None:
    """HF rope_scaling from the metadata keys, or from llama.cpp's rope_freqs tensor (llama3)."""
    kind = meta.get(f"{arch_name}.rope.scaling.type")
    factor = meta.get(f"{arch_name}.rope.scaling.factor")
    orig_ctx = meta.get(f"{arch_name}.rope.scaling.original_context_length")
    freqs_info = next((t for t in header.tensors if t.name == "rope_freqs.weight"), None)
    if freqs_info is not None:
        with _mapped(file) as buf:
            freqs = _dequantize(buf, freqs_info).reshape(-1).astype(np.float64)
        return _llama3_from_freqs(file, freqs, head_dim, rope_theta, orig_ctx or 8192)
    if kind in (None, "none") or not factor or factor == 1.0:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32(factor)}
    if kind == "yarn":
        out: dict[str, Any] = {"rope_type": "yarn", "factor": _f32(factor)}
        if orig_ctx:
            out["original_max_position_embeddings"] = int(orig_ctx)
        return out
    raise GGUFError(f"{file} uses rope scaling {kind!r}, which xlaserve does not support")


def llama3_rope_factors(
    head_dim: int, rope_theta: float, factor: float, low: float, high: float, orig_ctx: int
) -> np.ndarray:
    """Per-frequency divisors of llama3 rope scaling, as llama.cpp stores them in rope_freqs."""
    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (orig_ctx / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < orig_ctx / high, 1.0, np.where(wavelen > orig_ctx / low, factor, mid))


def _llama3_from_freqs(
    file: Path, freqs: np.ndarray, head_dim: int, rope_theta: float, orig_ctx: int
) -> dict[str, Any] | None:
    """Recover llama3 rope_scaling parameters from the factors llama.cpp precomputed.

    The factors are 1 at high frequencies, ``factor`` at low ones, and in between
    ``1/f = (1 - s)/factor + s`` with ``s = (orig_ctx/wavelen - low)/(high - low)``, linear in
    ``1/wavelen``; a line fit through the middle band gives low and high. The result is checked by
    recomputing the factors.
    """
    if freqs.shape != (head_dim // 2,):
        raise GGUFError(
            f"{file} has a rope_freqs tensor of {freqs.size} values, not {head_dim // 2}"
        )
    factor = float(freqs.max())
    if abs(factor - 1.0) < 1e-6:
        return None
    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    x = orig_ctx * inv_freq / (2 * math.pi)  # orig_ctx / wavelen
    band = (freqs > 1 + 1e-4) & (freqs < factor - 1e-4)
    low, high = 1.0, 4.0  # Llama 3.x values, used when the band has < 2 points to fit
    if band.sum() >= 2:
        s = (1.0 / freqs[band] - 1.0 / factor) / (1.0 - 1.0 / factor)
        a, b = np.polyfit(x[band], s, 1)
        low, high = -b / a, -b / a + 1.0 / a
        low, high = round(float(low), 4), round(float(high), 4)
    got = llama3_rope_factors(head_dim, rope_theta, factor, low, high, orig_ctx)
    if not np.allclose(got, freqs, rtol=1e-3, atol=1e-4):
        raise GGUFError(f"{file} has rope_freqs factors that do not match llama3 rope scaling")
    return {
        "rope_type": "llama3",
        "factor": round(factor, 6),
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": int(orig_ctx),
    }


def _generation_config(
    meta: dict[str, Any], cfg: dict[str, Any], tokenizer: PreTrainedTokenizerFast
) -> dict[str, Any]:
    """bos/eos/pad ids for generation. eos is a list: the file's eos, then its end-of-turn token.

    Gemma 3 files state only ``<eos>``, while HF's generation_config for the family also stops on
    ``<end_of_turn>``; without it a chat with an instruction-tuned Gemma GGUF never stops.
    """
    eos: list[int] = []
    for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        v = meta.get(k)
        if isinstance(v, int) and v not in eos:
            eos.append(v)
    if cfg["model_type"] == "gemma3_text":
        eot = tokenizer.convert_tokens_to_ids("<end_of_turn>")
        if isinstance(eot, int) and eot != tokenizer.unk_token_id and eot not in eos:
            eos.append(eot)
    return {
        "bos_token_id": cfg["bos_token_id"],
        "eos_token_id": eos,
        "pad_token_id": cfg["pad_token_id"],
    }
