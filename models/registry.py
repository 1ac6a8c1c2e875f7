"""What every model source shares: the loaded-model record, the load error, families and dtypes.

The sources (``models.hf_dir``, ``models.gguf``, ``models.orbax_source``) import this module and
never each other; ``models.loader`` picks the source for a path. A source turns a path plus
``LoadOptions`` into a ``LoadedModel``; every failure a user can cause is a ``ModelLoadError``
with a one-line message (the CLI prints it and exits 1).

Two kinds of model come out: decoders (``config`` a ``ModelConfig``, a family from ``FAMILIES``,
run by the generation engine) and BERT-family encoders (``config`` a ``BertConfig``, a
``BertModel`` or ``BertForSequenceClassification``, run by the pooling runner).
``LoadedModel.is_encoder`` tells them apart.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from models.bert import BertConfig
from models.config import ModelConfig
from models.gemma3 import Gemma3Model
from models.inputs import AttentionFn, WriteKVFn
from models.llama import LlamaModel
from models.weights import Place, default_place, load_weights

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


class ModelLoadError(RuntimeError):
    """A user-facing, one-line load failure (missing path, corrupt file, unsupported model…)."""


C = TypeVar("C", ModelConfig, BertConfig)


@dataclass(frozen=True)
class LoadedModel(Generic[C]):
    """A model ready to run, with what serving it needs to know.

    ``config`` is a ``ModelConfig`` for a decoder, a ``BertConfig`` for an encoder (a caller
    that knows which writes ``LoadedModel[ModelConfig]``). ``max_model_len`` is the default
    context length: ``max_position_embeddings`` for decoders; for encoders sentence-transformers'
    ``max_seq_length`` capped by the position table, else the position table
    (``BertConfig.max_input_len``). ``tokenizer`` is a transformers fast tokenizer (encoders:
    truncating from the left, or None when the directory ships none). ``name`` is the default
    served model name, ``source`` the resolved path.
    """

    config: C
    model: nnx.Module
    tokenizer: Any  # transformers.PreTrainedTokenizerFast
    generation_config: dict[str, Any]
    name: str
    source: str
    dtype: Any
    max_model_len: int
    load_seconds: float = 0.0

    @property
    def is_encoder(self) -> bool:
        """A bidirectional BERT-family encoder (pooling only), not a generating decoder."""
        return isinstance(self.config, BertConfig)


@dataclass(frozen=True)
class LoadOptions:
    """How to build a model, whatever its source.

    ``dtype`` is the user's string (see ``resolve_dtype``). ``attn_fn``, ``write_fn`` and
    ``place`` (the sharding hook, see ``models.weights``) are decoder-only: an encoder runs on
    one device with its own attention. ``tokenizer_path`` replaces the source's tokenizer with
    the one in that HF directory.
    """

    attn_fn: AttentionFn
    write_fn: WriteKVFn
    dtype: str = "auto"
    place: Place = default_place
    tokenizer_path: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        resolve_dtype(self.dtype)  # a bad --dtype fails before any file is read


FAMILIES: dict[str, type] = {
    "llama": LlamaModel, "mistral": LlamaModel, "qwen2": LlamaModel, "qwen3": LlamaModel,
    "gemma3_text": Gemma3Model,
}

_DTYPES = {"float32": jnp.float32, "float": jnp.float32, "bfloat16": jnp.bfloat16,
           "float16": jnp.float16, "half": jnp.float16}


def resolve_dtype(dtype: str, *, encoder: bool = False) -> Any:
    """The jnp dtype a ``--dtype`` string names. "auto": float32 on CPU, else bfloat16, and
    float32 everywhere for encoders (they are small, and bf16 costs more accuracy than the
    embedding goldens allow)."""
    if dtype == "auto":
        return jnp.float32 if encoder or jax.default_backend() == "cpu" else jnp.bfloat16
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def build_model(cfg: ModelConfig, dtype: Any, attn_fn: AttentionFn, write_fn: WriteKVFn,
                abstract: bool = False) -> nnx.Module:
    family = FAMILIES[cfg.model_type]
    make: Callable[[], nnx.Module] = lambda: family(cfg, dtype, attn_fn, write_fn)
    return nnx.eval_shape(make) if abstract else make()


def random_model(cfg: ModelConfig, dtype: Any, attn_fn: AttentionFn, write_fn: WriteKVFn,
                 seed: int = 0, scale: float = 0.5) -> nnx.Module:
    """A model with random weights (tests and GPU benchmarks where no checkpoint can be had)."""
    model = build_model(cfg, dtype, attn_fn, write_fn, abstract=True)
    rng = np.random.default_rng(seed)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param):
            shape = tuple(node.shape)
            fan_in = shape[0] if len(shape) > 1 else 1
            if len(shape) == 1:
                val = 1.0 + 0.1 * rng.standard_normal(shape)
            else:
                val = rng.standard_normal(shape) * (scale / np.sqrt(fan_in))
            node.set_value(jax.device_put(val.astype(jnp.dtype(dtype))))
    return model


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file as a dict; a missing file is ``{}``, a malformed one an error."""
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None


def tokenizer_dir(path: Path) -> PreTrainedTokenizerFast:
    """The tokenizer of an HF directory (``models.tokenizer.load_tokenizer``), its complaints
    as ``ModelLoadError``."""
    from models.tokenizer import TokenizerError, load_tokenizer

    try:
        return load_tokenizer(path)
    except TokenizerError as e:
        raise ModelLoadError(str(e)) from None


def decoder_config(hf_config: dict[str, Any], where: Path) -> ModelConfig:
    """``ModelConfig.from_hf``, its complaints as ``ModelLoadError`` naming ``where``."""
    try:
        return ModelConfig.from_hf(hf_config)
    except (ValueError, KeyError) as e:
        raise ModelLoadError(f"{where}: {e}") from None


def load_decoder(cfg: ModelConfig, tensors: Iterator[tuple[str, np.ndarray]], opts: LoadOptions,
                 *, tokenizer: Any, generation_config: dict[str, Any], name: str, where: Path,
                 total: int | None = None) -> LoadedModel[ModelConfig]:
    """Build ``cfg``'s family module abstractly (no weight-sized allocation) and stream
    ``tensors`` (HF names, float32 numpy, see ``models.weights``) into it, one at a time.
    ``total`` is the tensor count for the progress bar, when the source knows it."""
    jdtype = resolve_dtype(opts.dtype)
    model = build_model(cfg, jdtype, opts.attn_fn, opts.write_fn, abstract=True)
    if opts.progress:
        tensors = tqdm(tensors, total=total, desc="loading weights", unit="tensor",
                       file=sys.stderr)
    try:
        load_weights(model, cfg, tensors, jdtype, opts.place)
    except ValueError as e:
        raise ModelLoadError(f"{where}: {e}") from None
    return LoadedModel(cfg, model, tokenizer, generation_config, name, str(where), jdtype,
                       cfg.max_position_embeddings)
