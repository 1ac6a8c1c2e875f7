"""Hugging Face model directories: ``config.json``, ``*.safetensors`` and the tokenizer files.

Called by ``models.loader`` for a directory with a ``config.json``. What the directory holds is
its ``config.json``'s ``model_type``:

- a BERT-family encoder (``models.bert.is_encoder_dir``): built by ``models.bert.load_bert``,
  float32 for ``dtype="auto"``, its tokenizer truncating from the left, or none;
- otherwise a decoder: ``ModelConfig.from_hf`` must know the family, and the safetensors tensors
  (HF names, any dtype, read one at a time as float32) stream into the family's module.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.bert import BertConfig, UnsupportedModelError, is_encoder_dir, load_bert
from models.config import ModelConfig
from models.registry import (
    LoadedModel,
    LoadOptions,
    ModelLoadError,
    decoder_config,
    load_decoder,
    read_json,
    resolve_dtype,
    tokenizer_dir,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


def load(path: Path, opts: LoadOptions) -> LoadedModel[Any]:
    """The encoder or decoder in the HF directory ``path``."""
    if is_encoder_dir(path):
        return _load_encoder(path, opts)
    return _load_decoder(path, opts)


def _load_decoder(path: Path, opts: LoadOptions) -> LoadedModel[ModelConfig]:
    cfg = decoder_config(read_json(path / "config.json"), path)
    files, total = _safetensors_files(path)
    tokenizer = tokenizer_dir(Path(opts.tokenizer_path or path))
    return load_decoder(cfg, _iter_safetensors(files), opts, tokenizer=tokenizer,
                        generation_config=read_json(path / "generation_config.json"),
                        name=path.name, where=path, total=total)


def _load_encoder(path: Path, opts: LoadOptions) -> LoadedModel[BertConfig]:
    jdtype = resolve_dtype(opts.dtype, encoder=True)
    try:
        model = load_bert(path, jdtype)  # reads config.json first: refused before any weight
    except UnsupportedModelError as e:
        raise ModelLoadError(str(e)) from None
    cfg: BertConfig = model.cfg
    try:
        max_model_len = resolve_max_model_len(path, cfg)
        tokenizer = encoder_tokenizer(Path(opts.tokenizer_path or path))
    except ValueError as e:  # a bad sentence_bert_config.json, TokenizerError
        raise ModelLoadError(str(e)) from None
    return LoadedModel(cfg, model, tokenizer, {}, path.name, str(path), jdtype, max_model_len)


def encoder_tokenizer(path: str | Path) -> PreTrainedTokenizerFast | None:
    """The tokenizer of an encoder directory, truncating from the left (as vLLM, which keeps a
    prompt's end); None for a directory that ships no tokenizer files (the model then takes
    token ids only). Raises ``TokenizerError`` for a tokenizer that cannot be loaded."""
    from models.tokenizer import has_tokenizer_files, load_tokenizer

    d = Path(path)
    if d.is_dir() and not has_tokenizer_files(d):
        return None
    tokenizer = load_tokenizer(d)
    tokenizer.truncation_side = "left"
    return tokenizer


def resolve_max_model_len(model_dir: Path, cfg: BertConfig) -> int:
    """An encoder's default context length: sentence-transformers' ``max_seq_length`` from
    ``sentence_bert_config.json`` capped by the position table, else the position table
    (``cfg.max_input_len``). Raises ``ValueError``."""
    limit = cfg.max_input_len
    st_path = model_dir / "sentence_bert_config.json"
    if st_path.exists():
        try:
            st_len = json.loads(st_path.read_text()).get("max_seq_length")
        except json.JSONDecodeError as e:
            raise ValueError(f"{st_path} is not valid JSON: {e}") from None
        if isinstance(st_len, int) and st_len > 0:
            return min(st_len, limit)
    return limit


def _safetensors_files(path: Path) -> tuple[list[Path], int]:
    """The weight files (from the shard index when there is one) and their tensor count."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted({path / f for f in read_json(index)["weight_map"].values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors weights")
    count = 0
    for f in files:
        with safe_open(str(f), "numpy") as sf:
            count += len(list(sf.keys()))
    return files, count


def _iter_safetensors(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), "numpy") as sf:
            for name in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, sf.get_tensor(name).astype(np.float32)
