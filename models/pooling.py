"""Poolers: from per-token hidden states to one output per sequence.

Model-agnostic. ``pool_chunks`` reduces a packed, ragged token axis ``[T, D]`` grouped by
sequence (the layout of every model step, ``models.inputs.StepInputs``); it is pure jnp, traced
inside the runner's compiled pooling executable. Normalisation and activations are host-side,
per request (``l2_normalize_np``, ``apply_activation``).

Where the pooler configuration comes from, highest priority first:
1. ``--override-pooler-config`` (``{"pooling_type": "MEAN", "normalize": true}``);
2. the sentence-transformers files next to the model: ``modules.json`` lists the pipeline
   (Transformer, Pooling, optional Normalize); the Pooling module's ``config.json`` says which
   pooling mode; a Normalize module means L2 normalisation;
3. defaults by kind: encoders CLS + normalize (vLLM's default for BERT embedding models),
   decoders LAST + normalize, classifiers CLS (their head reads token 0 itself).

Axis letters: S sequences, T tokens (packed), D hidden dim, L labels.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class PoolingType(enum.StrEnum):
    MEAN = "MEAN"  # average over the sequence's tokens
    CLS = "CLS"  # the first token
    LAST = "LAST"  # the last token (decoder embedding models)


class PoolerConfigError(ValueError):
    """A pooler configuration this project cannot honour; the message names the field."""


@dataclass(frozen=True)
class PoolerConfig:
    pooling_type: PoolingType = PoolingType.CLS
    normalize: bool = True  # L2-normalise pooled vectors unless a request says otherwise
    source: str = "default"  # where the choice came from, for the startup log


_ST_MODES = {
    "pooling_mode_cls_token": PoolingType.CLS,
    "pooling_mode_mean_tokens": PoolingType.MEAN,
    "pooling_mode_lasttoken": PoolingType.LAST,
}
# Pooling modes sentence-transformers offers that we do not implement: refuse, never ignore.
_ST_UNSUPPORTED = (
    "pooling_mode_max_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
)
_ST_SUPPORTED_MODULES = {
    "sentence_transformers.models.Transformer",
    "sentence_transformers.models.Pooling",
    "sentence_transformers.models.Normalize",
}


def read_sentence_transformers_config(model_dir: str | Path) -> PoolerConfig | None:
    """The pooler a sentence-transformers model declares, or None when it has no modules.json.

    Raises ``PoolerConfigError`` for a pipeline we would compute differently (a Dense
    projection, max pooling, a prompt-excluding pooler).
    """
    model_dir = Path(model_dir)
    modules_path = model_dir / "modules.json"
    if not modules_path.exists():
        return None
    modules = json.loads(modules_path.read_text())
    pooling: PoolingType | None = None
    normalize = False
    for mod in modules:
        kind = mod.get("type", "")
        if kind not in _ST_SUPPORTED_MODULES:
            raise PoolerConfigError(f"sentence-transformers module {kind!r} is not supported")
        if kind.endswith(".Transformer") and mod.get("path", "") not in ("", "."):
            raise PoolerConfigError(
                f"the transformer lives in the subfolder {mod['path']!r}; point the model "
                "path at that folder"
            )
        if kind.endswith(".Normalize"):
            normalize = True
        if kind.endswith(".Pooling"):
            cfg_path = model_dir / mod.get("path", "") / "config.json"
            cfg = json.loads(cfg_path.read_text())
            pooling = _st_pooling_mode(cfg)
    if pooling is None:
        raise PoolerConfigError("modules.json has no Pooling module")
    return PoolerConfig(pooling, normalize, source="sentence-transformers")


def _st_pooling_mode(cfg: dict[str, Any]) -> PoolingType:
    for key in _ST_UNSUPPORTED:
        if cfg.get(key):
            raise PoolerConfigError(f"sentence-transformers pooling {key!r} is not supported")
    if cfg.get("include_prompt") is False:
        raise PoolerConfigError("sentence-transformers pooling with include_prompt=false is not "
                                "supported")
    modes = [t for key, t in _ST_MODES.items() if cfg.get(key)]
    if len(modes) != 1:
        raise PoolerConfigError(f"expected exactly one pooling mode in 1_Pooling, got {modes}")
    return modes[0]


def parse_override(override: str | dict[str, Any] | None) -> dict[str, Any]:
    """``--override-pooler-config`` as given (a JSON string or a dict) -> validated fields."""
    if override is None or override == "":
        return {}
    raw = json.loads(override) if isinstance(override, str) else dict(override)
    if not isinstance(raw, dict):
        raise PoolerConfigError(f"expected a JSON object, got {override!r}")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "pooling_type":
            try:
                out[key] = PoolingType(str(value).upper())
            except ValueError:
                raise PoolerConfigError(
                    f"pooling_type must be one of {[t.value for t in PoolingType]}, got {value!r}"
                ) from None
        elif key == "normalize":
            if not isinstance(value, bool):
                raise PoolerConfigError(f"normalize must be a boolean, got {value!r}")
            out[key] = value
        else:
            raise PoolerConfigError(f"unknown pooler config field {key!r} "
                                    "(supported: pooling_type, normalize)")
    return out


def resolve_pooler_config(
    model_dir: str | Path | None,
    *,
    is_decoder: bool = False,
    override: str | dict[str, Any] | None = None,
) -> PoolerConfig:
    """The effective pooler for a model: override > sentence-transformers files > defaults."""
    cfg = read_sentence_transformers_config(model_dir) if model_dir is not None else None
    if cfg is None:
        cfg = PoolerConfig(PoolingType.LAST if is_decoder else PoolingType.CLS, True)
    fields = parse_override(override)
    if fields:
        cfg = replace(cfg, **fields, source="override")
    return cfg


# ----------------------------------------------------------------------------- pooling math


def pool_chunks(hidden: jax.Array, cu_lens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-sequence reductions of a packed step. hidden: [T, D], tokens grouped by sequence;
    cu_lens: i32[S+1] (sequence s owns tokens ``cu_lens[s]:cu_lens[s+1]``; tokens past
    ``cu_lens[S]`` are padding).

    Returns float32 ``(first, last, total)``, each [S, D]: the first and last token's state and
    the sum over the sequence's tokens; rows of empty sequences are zero. A prompt that spans
    several steps (chunked prefill) pools from these per chunk: CLS is the first chunk's
    ``first``, LAST the final chunk's ``last``, MEAN the sum of ``total`` over the chunks divided
    by the prompt's length (``serving.engine.request.PoolAccumulator``).
    """
    t = hidden.shape[0]
    s = cu_lens.shape[0] - 1
    h = hidden.astype(jnp.float32)
    lens = cu_lens[1:] - cu_lens[:-1]  # [S]
    seq = jnp.searchsorted(cu_lens[1:], jnp.arange(t, dtype=jnp.int32), side="right")  # S: pad
    total = jax.ops.segment_sum(h, seq, num_segments=s + 1)[:s]
    present = (lens > 0)[:, None]
    first = jnp.where(present, h[jnp.clip(cu_lens[:-1], 0, t - 1)], 0.0)
    last = jnp.where(present, h[jnp.clip(cu_lens[1:] - 1, 0, t - 1)], 0.0)
    return first, last, total


def l2_normalize_np(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Host-side ``l2_normalize`` for per-request post-processing."""
    norm = np.sqrt(np.sum(np.square(x, dtype=np.float32), axis=-1, keepdims=True))
    return (x / np.maximum(norm, eps)).astype(np.float32)


# ----------------------------------------------------------------------------- classifiers


class Activation(enum.StrEnum):
    SIGMOID = "sigmoid"
    SOFTMAX = "softmax"
    IDENTITY = "identity"


# sentence-transformers CrossEncoder records its activation as a torch class path.
_TORCH_ACTIVATIONS = {
    "torch.nn.modules.activation.Sigmoid": Activation.SIGMOID,
    "torch.nn.modules.activation.Softmax": Activation.SOFTMAX,
    "torch.nn.modules.linear.Identity": Activation.IDENTITY,
    "torch.nn.Sigmoid": Activation.SIGMOID,
    "torch.nn.Softmax": Activation.SOFTMAX,
    "torch.nn.Identity": Activation.IDENTITY,
}


def classify_activation(num_labels: int, problem_type: str | None) -> Activation:
    """Activation for classification outputs, following transformers' loss choice.

    regression -> identity; multi-label -> sigmoid; otherwise one label -> sigmoid, several ->
    softmax.
    """
    if problem_type == "regression":
        return Activation.IDENTITY
    if problem_type == "multi_label_classification":
        return Activation.SIGMOID
    return Activation.SIGMOID if num_labels < 2 else Activation.SOFTMAX


def score_activation(num_labels: int, problem_type: str | None,
                     cross_encoder_activation: str | None) -> Activation:
    """Activation for cross-encoder scores: the sentence-transformers setting when the config
    has one, else the classification rule."""
    if cross_encoder_activation:
        if cross_encoder_activation not in _TORCH_ACTIVATIONS:
            raise PoolerConfigError(
                f"cross-encoder activation {cross_encoder_activation!r} is not supported")
        return _TORCH_ACTIVATIONS[cross_encoder_activation]
    return classify_activation(num_labels, problem_type)


def apply_activation(logits: np.ndarray, activation: Activation) -> np.ndarray:
    """Apply ``activation`` on the last axis of float logits (host side, float32)."""
    x = logits.astype(np.float32)
    if activation == Activation.SIGMOID:
        # The tanh form of the logistic never overflows, unlike 1 / (1 + exp(-x)).
        return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)
    if activation == Activation.SOFTMAX:
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
    return x
