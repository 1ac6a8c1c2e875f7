"""GGUF model source: a llama.cpp ``.gguf`` file as HF-style config, tokenizer and f32 tensors.

Called by the model loader (``models.loader``, through ``load``) when a model spec names a
``.gguf`` file or a directory holding exactly one. ``load_gguf`` reads only the file's header
(metadata and tensor directory) and builds the tokenizer; tensor data stays in the file until the
caller iterates ``GGUFModel.tensors()``, which dequantizes one tensor at a time, so peak memory
stays near the size of the final float32 weights plus one tensor.

Contract of the output, shared with the HF-directory source:
- ``hf_config`` is a transformers-style ``config.json`` dict (``model_type`` "llama", "qwen2",
  "qwen3" or "gemma3_text"). Both the flat rope keys (``rope_theta``, ``rope_scaling``,
  ``rope_local_base_freq``) and transformers 5's ``rope_parameters`` are filled in.
- ``tensors()`` yields HF parameter names with float32 numpy arrays in HF layout: linears are
  ``[out, in]`` (the reverse of GGUF's dimension list, which is what numpy order gives), Q/K rows
  are in HF's half-split rope order (llama.cpp's interleave undone), and Gemma norms are the HF
  weights (llama.cpp's stored ``w + 1`` undone).

The names come from gguf-py's own tables: metadata keys from ``gguf.Keys``, value types from
``gguf.GGUFValueType``, tensor names from ``gguf.TensorNameMap`` for the file's architecture.
We walk the header ourselves rather than with ``gguf.GGUFReader``: the reader wraps every
vocabulary string in numpy views, which costs 2-3 s for SmolLM2's 49k tokens and 10-20 s for
Gemma 3's 262k, where the walk takes 0.1 s and 0.2-0.3 s (25-65x faster; ``python -m
bench.gguf_header``, docs/BENCHMARKS.md). Dequantization is ``gguf.quants.dequantize``.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import struct
import sys
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    MODEL_ARCH,
    MODEL_ARCH_NAMES,
    MODEL_TENSOR,
    TENSOR_NAMES,
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
    Keys,
    TensorNameMap,
)
from gguf.quants import dequantize
from tqdm import tqdm

from models.config import ModelConfig
from models.registry import (
    LoadedModel,
    LoadOptions,
    ModelLoadError,
    decoder_config,
    load_decoder,
    tokenizer_dir,
)
from models.weights import HF_GLOBAL_WEIGHTS, HF_LAYER_WEIGHTS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


class GGUFError(ValueError):
    """A GGUF file cannot be used; the message is one line, fit to show a user as is."""


# --------------------------------------------------------------------------------------------
# Header parsing
# --------------------------------------------------------------------------------------------

_SUPPORTED_VERSIONS = (2, 3)  # v1 counted with 32-bit integers; no file in use still has it

# The numpy type of each fixed-width metadata value type, from gguf-py's reader (little-endian:
# we refuse big-endian files).
_SCALAR_DTYPES = {
    vtype: np.dtype(t).newbyteorder("<") for vtype, t in GGUFReader.gguf_scalar_to_np.items()
}

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

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.scalar("<I")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise GGUFError(f"{self.path} is corrupt: unknown metadata {what} type {raw}") from None

    def scalars(self, vtype: GGUFValueType, count: int) -> list[Any]:
        dtype = _SCALAR_DTYPES[vtype]
        self._need(count * dtype.itemsize)
        arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        self.pos += count * dtype.itemsize
        return list(arr.tolist())

    def value(self, vtype: GGUFValueType) -> Any:
        if vtype in _SCALAR_DTYPES:
            return self.scalars(vtype, 1)[0]
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype != GGUFValueType.ARRAY:  # a scalar type gguf-py's reader table lacks
            raise GGUFError(f"{self.path} has metadata of type {vtype.name}, which xlaserve "
                            "does not read")
        etype = self.value_type("array")
        count = self.scalar("<Q")
        if etype in _SCALAR_DTYPES:
            return self.scalars(etype, count)
        if etype == GGUFValueType.STRING:
            self._need(count * 8)  # every string has at least its 8-byte length
            return [self.string() for _ in range(count)]
        if etype != GGUFValueType.ARRAY:
            raise GGUFError(f"{self.path} has metadata arrays of {etype.name}, which xlaserve "
                            "does not read")
        self._need(count * 12)  # nested arrays: each has at least its type and length
        return [self.value(etype) for _ in range(count)]


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
    if cur.scalar("<I") != GGUF_MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
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
        metadata[key] = cur.value(cur.value_type("value"))
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

    alignment = metadata.get(Keys.General.ALIGNMENT, GGUF_DEFAULT_ALIGNMENT)
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

# Tensors llama.cpp adds that have no HF parameter. rope_freqs holds llama3 rope scaling factors,
# which we turn back into the config's rope_scaling instead.
_ROPE_FREQS = f"{TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS]}.weight"
_IGNORED_NAMES = {_ROPE_FREQS}


@dataclass(frozen=True)
class _Arch:
    model_type: str
    hf_class: str
    # llama.cpp interleaves Q/K rows for archs it runs with "normal" (pairwise) rope.
    permuted_qk: bool
    # llama.cpp stores Gemma RMSNorm weights as w + 1 (Gemma computes x * (1 + w)).
    norm_shift: float


_ARCHS = {
    MODEL_ARCH.LLAMA: _Arch("llama", "LlamaForCausalLM", permuted_qk=True, norm_shift=0.0),
    MODEL_ARCH.QWEN2: _Arch("qwen2", "Qwen2ForCausalLM", permuted_qk=False, norm_shift=0.0),
    MODEL_ARCH.QWEN3: _Arch("qwen3", "Qwen3ForCausalLM", permuted_qk=False, norm_shift=0.0),
    MODEL_ARCH.GEMMA3: _Arch("gemma3_text", "Gemma3ForCausalLM", permuted_qk=False,
                             norm_shift=1.0),
}
SUPPORTED_ARCHITECTURES = tuple(sorted(MODEL_ARCH_NAMES[a] for a in _ARCHS))
_ARCH_OF_NAME = {MODEL_ARCH_NAMES[a]: a for a in _ARCHS}


def _tensor_names(arch: MODEL_ARCH, n_layers: int) -> dict[str, str]:
    """GGUF tensor name -> HF name, for every tensor ``models.weights`` reads that this
    architecture has: gguf-py's ``TensorNameMap`` knows, e.g., that Gemma 3's ``ffn_norm`` is
    HF's ``pre_feedforward_layernorm`` while Llama's is ``post_attention_layernorm``."""
    tmap = TensorNameMap(arch, n_layers)
    hf_names = [*HF_GLOBAL_WEIGHTS,
                *(f"model.layers.{i}.{name}" for i in range(n_layers) for name in HF_LAYER_WEIGHTS)]
    names = {}
    for hf_name in hf_names:
        module, suffix = hf_name.rsplit(".", 1)  # weight | bias
        gguf_module = tmap.get_name(module)
        if gguf_module is not None:
            names[f"{gguf_module}.{suffix}"] = hf_name
    return names


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


@dataclass(frozen=True)
class _Layout:
    """What the header says about the model's structure, before any config is built."""

    arch_name: str  # general.architecture, the prefix of the architecture's metadata keys
    arch: _Arch
    names: dict[str, str]  # GGUF tensor name -> HF name, for this architecture and depth


@dataclass(frozen=True)
class GGUFModel:
    """A GGUF checkpoint, ready for the Flax model builder.

    Built by ``load_gguf``. ``tensors()`` may be called more than once; each call re-reads the file.
    """

    path: Path
    hf_config: dict[str, Any]
    tokenizer: PreTrainedTokenizerFast
    generation_config: dict[str, Any]
    header: GGUFHeader = field(repr=False)
    _layout: _Layout = field(repr=False)

    @property
    def num_tensors(self) -> int:
        """How many tensors ``tensors()`` yields."""
        return sum(1 for t in self.header.tensors if t.name not in _IGNORED_NAMES)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF name -> shape for every tensor ``tensors()`` yields, without reading any data."""
        names = self._layout.names
        return {names[info.name]: info.shape for info in self.header.tensors
                if info.name in names}

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
        names, arch = self._layout.names, self._layout.arch
        infos = [t for t in self.header.tensors  # every name is known (checked in load_gguf)
                 if t.name not in _IGNORED_NAMES and (only is None or names[t.name] in only)]
        with _mapped(self.path) as buf:
            if len(buf) != self.header.file_size:
                raise GGUFError(f"{self.path} changed on disk since it was loaded")
            bar = tqdm(
                infos, desc="dequantizing GGUF", unit="tensor", file=sys.stderr,
                disable=not progress, leave=False,
            )  # fmt: skip
            for info in bar:
                hf_name = names[info.name]
                w = _dequantize(buf, info)
                if arch.permuted_qk and ".self_attn.q_proj." in hf_name:
                    w = _unpermute_rows(w, n_q)
                elif arch.permuted_qk and ".self_attn.k_proj." in hf_name:
                    w = _unpermute_rows(w, n_kv)
                if arch.norm_shift and hf_name.endswith("norm.weight"):
                    w = w - np.float32(arch.norm_shift)
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
    layout = _layout_of(file, header)
    _check_tensors(file, layout, header)
    return _build_config(file, layout, header)


def _layout_of(file: Path, header: GGUFHeader) -> _Layout:
    arch_name = header.metadata.get(Keys.General.ARCHITECTURE)
    if not isinstance(arch_name, str):
        raise GGUFError(f"{file} is corrupt: it has no {Keys.General.ARCHITECTURE}")
    model_arch = _ARCH_OF_NAME.get(arch_name)
    if model_arch is None:
        raise GGUFError(
            f"unsupported GGUF architecture {arch_name!r} in {file}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    block_count = Keys.LLM.BLOCK_COUNT.format(arch=arch_name)
    n_layers = header.metadata.get(block_count)
    if not isinstance(n_layers, int) or n_layers < 1:
        raise GGUFError(f"{file} is missing metadata key {block_count}")
    return _Layout(arch_name, _ARCHS[model_arch], _tensor_names(model_arch, n_layers))


def load_gguf(
    path: str | Path, *, tokenizer_cache: bool = True, progress: bool = True
) -> GGUFModel:
    """Open a GGUF checkpoint: parse its header, build config and tokenizer, check its tensors.

    ``path`` is a .gguf file or a directory holding exactly one. No tensor data is read here
    (except llama3 rope factors); iterate ``tensors()`` for the weights. Every problem a user can
    cause (missing path, not GGUF, truncated, unsupported architecture or quantization type,
    tensors that do not match the config, no usable tokenizer) raises GGUFError with a one-line
    message. ``tokenizer_cache`` reuses a tokenizer built before from an identical header (see
    ``models.tokenizer``).
    """
    from models.tokenizer import TokenizerError, tokenizer_from_gguf

    file = find_gguf_file(path)
    header = read_header(file)
    layout = _layout_of(file, header)
    _check_tensors(file, layout, header)
    hf_config = _build_config(file, layout, header)
    try:
        tokenizer = tokenizer_from_gguf(
            header.metadata, cache_key=header.header_sha256 if tokenizer_cache else None,
            progress=progress,
        )  # fmt: skip
    except TokenizerError as e:
        raise GGUFError(f"{file}: {e}") from None
    gen = _generation_config(header.metadata, hf_config, tokenizer)
    return GGUFModel(file, hf_config, tokenizer, gen, header, layout)


def load(path: Path, opts: LoadOptions) -> LoadedModel[ModelConfig]:
    """The decoder in the GGUF file ``path`` (or the one .gguf in the directory ``path``),
    with ``opts.tokenizer_path``'s tokenizer instead of the file's when given."""
    try:
        g = load_gguf(path, progress=opts.progress)
    except GGUFError as e:
        raise ModelLoadError(str(e)) from None
    cfg = decoder_config(g.hf_config, g.path)
    tokenizer = tokenizer_dir(Path(opts.tokenizer_path)) if opts.tokenizer_path \
        else g.tokenizer
    return load_decoder(cfg, g.tensors(progress=opts.progress), opts, tokenizer=tokenizer,
                        generation_config=dict(g.generation_config), name=g.path.stem,
                        where=g.path, total=g.num_tensors)


def _check_tensors(file: Path, layout: _Layout, header: GGUFHeader) -> None:
    supported = set(SUPPORTED_QUANT_TYPES)
    for info in header.tensors:
        if info.name in _IGNORED_NAMES:
            continue
        if info.name not in layout.names:
            raise GGUFError(
                f"{file} has tensor {info.name!r}, which xlaserve does not know for "
                f"architecture {layout.arch_name!r}"
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


def _build_config(file: Path, layout: _Layout, header: GGUFHeader) -> dict[str, Any]:
    meta = header.metadata
    # Shapes by HF name; file_name turns an HF name back into the file's, for messages.
    shapes = {layout.names[t.name]: t.shape for t in header.tensors if t.name in layout.names}
    file_name = {hf: name for name, hf in layout.names.items()}

    def key(template: str, default: Any = None, required: bool = False) -> Any:
        full = template.format(arch=layout.arch_name)
        if full not in meta:
            if required:
                raise GGUFError(f"{file} is missing metadata key {full}")
            return default
        return meta[full]

    def need(hf_name: str) -> tuple[int, ...]:
        if hf_name not in shapes:
            raise GGUFError(f"{file} has no {file_name[hf_name]} tensor")
        return shapes[hf_name]

    n_layers = key(Keys.LLM.BLOCK_COUNT, required=True)
    hidden = key(Keys.LLM.EMBEDDING_LENGTH, required=True)
    n_heads = key(Keys.Attention.HEAD_COUNT, required=True)
    n_kv = key(Keys.Attention.HEAD_COUNT_KV, n_heads)
    if isinstance(n_heads, list) or isinstance(n_kv, list):
        # Per-layer head counts (e.g. OpenELM); none of our families do this.
        raise GGUFError(f"{file} has per-layer head counts, which xlaserve does not support")
    head_dim = (key(Keys.Attention.KEY_LENGTH) or key(Keys.Rope.DIMENSION_COUNT)
                or hidden // n_heads)
    vocab_size = need("model.embed_tokens.weight")[0]
    intermediate = key(Keys.LLM.FEED_FORWARD_LENGTH)
    if intermediate is None and "model.layers.0.mlp.up_proj.weight" in shapes:
        intermediate = shapes["model.layers.0.mlp.up_proj.weight"][0]
    rope_theta = _f32(key(Keys.Rope.FREQ_BASE, 10000.0))
    tied = "lm_head.weight" not in shapes
    attention_bias = "model.layers.0.self_attn.q_proj.bias" in shapes

    # Shapes must agree with the config, or the model would fail obscurely later.
    expected = {
        "model.layers.0.self_attn.q_proj.weight": (n_heads * head_dim, hidden),
        "model.layers.0.self_attn.k_proj.weight": (n_kv * head_dim, hidden),
        "model.layers.0.self_attn.v_proj.weight": (n_kv * head_dim, hidden),
    }
    for name, shape in expected.items():
        if need(name) != shape:
            raise GGUFError(
                f"{file} is inconsistent: {file_name[name]} has shape {shapes[name]}, "
                f"metadata implies {shape}"
            )
    missing = [
        file_name[name]
        for i in range(n_layers)
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.o_proj", "mlp.down_proj", "input_layernorm")
        if (name := f"model.layers.{i}.{part}.weight") not in shapes
    ]  # fmt: skip
    if missing:
        raise GGUFError(f"{file} is incomplete: {len(missing)} layer tensors missing, e.g. "
                        f"{missing[0]}")  # fmt: skip

    cfg: dict[str, Any] = {
        "model_type": layout.arch.model_type,
        "architectures": [layout.arch.hf_class],
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": key(Keys.LLM.CONTEXT_LENGTH, 2048),
        "rms_norm_eps": _f32(key(Keys.Attention.LAYERNORM_RMS_EPS, 1e-6)),
        "rope_theta": rope_theta,
        "rope_scaling": None,
        "attention_bias": attention_bias,
        "tie_word_embeddings": tied,
        "bos_token_id": meta.get(Keys.Tokenizer.BOS_ID),
        "eos_token_id": meta.get(Keys.Tokenizer.EOS_ID),
        "pad_token_id": meta.get(Keys.Tokenizer.PAD_ID),
    }
    scaling = _rope_scaling(file, layout.arch_name, meta, header, head_dim, rope_theta)

    if layout.arch.model_type == "gemma3_text":
        cfg["hidden_activation"] = "gelu_pytorch_tanh"
        sliding_window = key(Keys.Attention.SLIDING_WINDOW)
        pattern_meta = key(Keys.Attention.SLIDING_WINDOW_PATTERN)
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
        cfg["query_pre_attn_scalar"] = _gemma3_query_pre_attn_scalar(
            file, Keys.Attention.SCALE.format(arch=layout.arch_name), key(Keys.Attention.SCALE),
            head_dim)
        cfg["final_logit_softcapping"] = key(Keys.LLM.FINAL_LOGIT_SOFTCAPPING)
        cfg["attn_logit_softcapping"] = key(Keys.LLM.ATTN_LOGIT_SOFTCAPPING)
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
        cfg["use_qk_norm"] = "model.layers.0.self_attn.q_norm.weight" in shapes
        if layout.arch.model_type == "qwen3" and not cfg["use_qk_norm"]:
            raise GGUFError(f"{file} is a qwen3 model without attn_q_norm tensors")
    return cfg


def _gemma3_query_pre_attn_scalar(file: Path, scale_key: str, scale: float | None,
                                  head_dim: int) -> float:
    """Gemma 3's ``query_pre_attn_scalar`` (queries are scaled by its inverse square root).

    GGUF has no key for it: llama.cpp's converter drops it from config.json, and llama.cpp then
    recognises the 27B by its layer count (scale 1/sqrt(hidden/heads) there, 1/sqrt(head_dim)
    for every other size), while transformers' GGUF loader keeps ``Gemma3TextConfig``'s default
    (256). We recognise no model by its shape. The rule:

    1. ``{arch}.attention.scale`` (llama.cpp's ``f_attention_scale``, the factor on q.k), when the
       file states it: ``1 / scale**2``.
    2. Otherwise, where the two readings above agree, i.e. ``head_dim`` equals transformers'
       default (true of every published Gemma 3 except the 27B): that value.
    3. Otherwise the file cannot tell: GGUFError (the 27B, head_dim 128, was trained with 168;
       add the key to the file with gguf-py, or load the HF directory).
    """
    if scale is not None:
        if not scale > 0:
            raise GGUFError(f"{file} is corrupt: {scale_key} is {scale}")
        return _f32(1.0 / float(scale) ** 2)
    from transformers import Gemma3TextConfig

    default = float(Gemma3TextConfig().query_pre_attn_scalar)
    if head_dim != default:
        raise GGUFError(
            f"{file} does not state Gemma 3's attention scale ({scale_key}) and its head_dim "
            f"{head_dim} is not the {default:g} every Gemma 3 but the 27B uses; add the key "
            "(1/sqrt(query_pre_attn_scalar)) or load the model's HF directory"
        )
    return default


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
    kind = meta.get(Keys.Rope.SCALING_TYPE.format(arch=arch_name))
    factor = meta.get(Keys.Rope.SCALING_FACTOR.format(arch=arch_name))
    orig_ctx = meta.get(Keys.Rope.SCALING_ORIG_CTX_LEN.format(arch=arch_name))
    freqs_info = next((t for t in header.tensors if t.name == _ROPE_FREQS), None)
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
    for k in (Keys.Tokenizer.EOS_ID, Keys.Tokenizer.EOT_ID):
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
