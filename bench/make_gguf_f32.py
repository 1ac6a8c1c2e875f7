"""Write an unquantized (F32 or F16) GGUF from a quantized one, for the llama.cpp peer benchmarks.

xlaserve runs SmolLM2-135M-Instruct in f32 on CPU, dequantized from the Q4_1 GGUF asset; a fair
llama.cpp comparison needs the same weights at the same precision. This script reads the Q4_1 GGUF
with the ``gguf`` package, dequantizes every tensor, and writes a new GGUF that keeps:

* every KV metadata entry (tokenizer, chat template, hyper-parameters, ...) with its original value
  type, except ``general.file_type`` which now names the new precision;
* every tensor under its original name and in llama.cpp's own layout. In particular the Q/K
  projection rows stay in the interleaved-pair order ``convert_hf_to_gguf.py`` produced: llama.cpp
  applies its "normal" RoPE to that order, so un-permuting them here would break the model.

Precision: ``--dtype f32`` writes every tensor in F32 (file_type ALL_F32). ``--dtype f16`` writes
the matrices in F16 and keeps 1-D tensors (norm weights) in F32, as llama.cpp's converter does for
MOSTLY_F16. The values are exactly the dequantized Q4_1/Q8_0 values (F16 rounds them once more).

Called by ``scripts/build_peers.sh gguf``; run from the repo root with ``PYTHONPATH=$PWD``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
from gguf import (
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
    GGUFWriter,
    LlamaFileType,
)
from gguf.quants import dequantize

# Reader bookkeeping fields (header values the writer recomputes) and keys the writer sets itself.
_SKIP_PREFIX = "GGUF."
_WRITER_OWNED = {"general.architecture", "general.file_type", "general.alignment"}


def _field_value(field: Any) -> tuple[Any, GGUFValueType, GGUFValueType | None]:
    """The (value, type, array sub-type) of a reader field, ready for ``add_key_value``."""
    main = field.types[0]
    if main == GGUFValueType.ARRAY:
        sub = field.types[-1]
        if len(field.types) != 2:
            raise ValueError(f"{field.name}: nested arrays are not supported")
        return field.contents(), main, sub
    return field.contents(), main, None


def convert(src: Path, dst: Path, dtype: str) -> None:
    """Dequantize ``src`` into ``dst`` (``dtype`` in {"f32", "f16"}); see the module docstring."""
    reader = GGUFReader(src)
    arch_field = reader.get_field("general.architecture")
    if arch_field is None:
        raise ValueError(f"{src}: no general.architecture")
    arch = arch_field.contents()
    writer = GGUFWriter(dst, arch)

    alignment = reader.get_field("general.alignment")
    if alignment is not None:
        writer.data_alignment = int(alignment.contents())
        writer.add_custom_alignment(int(alignment.contents()))
    file_type = LlamaFileType.ALL_F32 if dtype == "f32" else LlamaFileType.MOSTLY_F16
    writer.add_file_type(int(file_type))

    for name, field in reader.fields.items():
        if name.startswith(_SKIP_PREFIX) or name in _WRITER_OWNED:
            continue
        value, vtype, sub = _field_value(field)
        writer.add_key_value(name, value, vtype, sub)

    for t in reader.tensors:
        # dequantize returns the numpy view of the tensor: shape reversed from GGUF's ne order,
        # which is also what add_tensor expects (it reverses it back when writing the header).
        w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        expected = tuple(int(d) for d in reversed(t.shape))
        if w.shape != expected:
            w = w.reshape(expected)
        if dtype == "f16" and w.ndim >= 2:
            w = w.astype(np.float16)
            writer.add_tensor(t.name, w, raw_dtype=GGMLQuantizationType.F16)
        else:
            writer.add_tensor(t.name, np.ascontiguousarray(w), raw_dtype=GGMLQuantizationType.F32)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _check(src: Path, dst: Path, dtype: str) -> None:
    """Re-read ``dst``: same KV keys (bar file_type), same tensor names/shapes, values match."""
    a, b = GGUFReader(src), GGUFReader(dst)
    ka = {k for k in a.fields if not k.startswith(_SKIP_PREFIX)}
    kb = {k for k in b.fields if not k.startswith(_SKIP_PREFIX)}
    if ka != kb:
        raise AssertionError(f"KV keys differ: {sorted(ka ^ kb)}")
    for key in ka - {"general.file_type"}:
        if a.fields[key].contents() != b.fields[key].contents():
            raise AssertionError(f"KV {key} differs")
    if [t.name for t in a.tensors] != [t.name for t in b.tensors]:
        raise AssertionError("tensor names or order differ")
    tol = 0.0 if dtype == "f32" else 1e-3
    for ta, tb in zip(a.tensors, b.tensors, strict=True):
        if list(ta.shape) != list(tb.shape):
            raise AssertionError(f"{ta.name}: shape {ta.shape} != {tb.shape}")
        wa = dequantize(ta.data, ta.tensor_type).reshape(-1)
        wb = dequantize(tb.data, tb.tensor_type).reshape(-1)
        err = float(np.max(np.abs(wa - wb) / (np.abs(wa) + 1e-2)))
        if err > tol:
            raise AssertionError(f"{ta.name}: relative error {err} > {tol}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", help="quantized GGUF (default: the smollm2-135m-instruct asset)")
    p.add_argument("--out", required=True, help="output GGUF path")
    p.add_argument("--dtype", choices=("f32", "f16"), default="f32")
    p.add_argument("--no-check", action="store_true", help="skip re-reading and comparing")
    args = p.parse_args(argv)

    if args.src:
        src = Path(args.src)
    else:
        from models import assets

        src = Path(assets.fetch("smollm2-135m-instruct"))
    dst = Path(args.out)
    dst.parent.mkdir(parents=True, exist_ok=True)
    convert(src, dst, args.dtype)
    if not args.no_check:
        _check(src, dst, args.dtype)
    print(f"wrote {dst} ({dst.stat().st_size / 2**20:.1f} MiB, {args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
