"""The BERT family of bidirectional encoders in Flax NNX: BERT, RoBERTa, XLM-RoBERTa.

Used by ``serving.engine.pooling_runner`` for embeddings (``BertModel`` + a pooler from
``models.pooling``) and cross-encoder scores (``BertForSequenceClassification`` and the RoBERTa
equivalent). Loaded from a Hugging Face directory: ``config.json`` + ``model.safetensors``.

Batch layout: a padded batch ``[S, T]`` of right-padded token ids with a length per row. Every row
attends to its own first ``lengths[s]`` tokens only, so what a row computes does not depend on its
neighbours or on how far it was padded (up to float summation order). Rows of length 0 are batch
padding; they produce finite garbage that the caller drops.

Axis letters: S sequences, T tokens (padded), D model dim, N heads, H head dim, F MLP dim,
V vocab, L labels.

Differences between the family members that matter here:
- RoBERTa / XLM-R number positions from ``pad_token_id + 1`` and skip pad tokens (HF's
  ``create_position_ids_from_input_ids``); BERT numbers them from 0.
- The sequence-classification head: BERT uses its pooler (dense + tanh on [CLS]) and then a
  linear classifier; RoBERTa has no pooler and uses ``classifier.dense`` + tanh +
  ``classifier.out_proj`` on ``<s>``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# model_type -> family; "roberta" means RoBERTa-style positions and classification head.
_FAMILIES = {
    "bert": "bert",
    "roberta": "roberta",
    "xlm-roberta": "roberta",
    "camembert": "roberta",
}
_ENCODER_ARCHS = {"BertModel", "RobertaModel", "XLMRobertaModel", "CamembertModel"}
_CLASSIFIER_ARCHS = {
    "BertForSequenceClassification",
    "RobertaForSequenceClassification",
    "XLMRobertaForSequenceClassification",
    "CamembertForSequenceClassification",
}
# Pretraining checkpoints: the encoder is usable for embeddings, the MLM head is ignored.
_IGNORED_HEAD_ARCHS = {"BertForMaskedLM", "RobertaForMaskedLM", "XLMRobertaForMaskedLM",
                       "BertForPreTraining"}

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

# Added to the scores of masked keys. Finite (not -inf) so that a fully masked row (a padding
# sequence of length 0) gives a uniform softmax instead of NaN.
_MASKED = -1e30


class UnsupportedModelError(ValueError):
    """The checkpoint is not a BERT-family model this module can run; the message says why."""


@dataclass(frozen=True)
class BertConfig:
    """What the encoder needs from ``config.json``. ``from_hf`` validates it."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    family: str = "bert"  # "bert" | "roberta"
    architecture: str = "BertModel"
    num_labels: int = 0  # > 0 only for sequence-classification checkpoints
    problem_type: str | None = None  # HF: regression | single_label_... | multi_label_...
    id2label: tuple[tuple[int, str], ...] = ()  # a tuple, not a dict: the config is hashed
    # sentence-transformers CrossEncoder activation class name, when the config records one
    cross_encoder_activation: str | None = None
    matryoshka_dimensions: tuple[int, ...] | None = None
    is_matryoshka: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def position_offset(self) -> int:
        """Index of the first real position in the position-embedding table."""
        return self.pad_token_id + 1 if self.family == "roberta" else 0

    @property
    def max_input_len(self) -> int:
        """Longest input the position table covers (RoBERTa loses ``pad_token_id + 1`` rows)."""
        return self.max_position_embeddings - self.position_offset

    @property
    def is_classifier(self) -> bool:
        return self.architecture in _CLASSIFIER_ARCHS

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> BertConfig:
        model_type = cfg.get("model_type", "")
        family = _FAMILIES.get(model_type)
        if family is None:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not a BERT-family encoder "
                f"(supported: {', '.join(sorted(_FAMILIES))})"
            )
        archs = cfg.get("architectures") or ["BertModel"]
        arch = archs[0]
        if arch in _IGNORED_HEAD_ARCHS:
            arch = "BertModel" if family == "bert" else "RobertaModel"
        if arch not in _ENCODER_ARCHS | _CLASSIFIER_ARCHS:
            raise UnsupportedModelError(f"architecture {arch!r} is not supported for pooling")
        pet = cfg.get("position_embedding_type", "absolute")
        if pet not in (None, "absolute"):
            raise UnsupportedModelError(f"position_embedding_type {pet!r} is not supported")
        act = cfg.get("hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported")
        if cfg["hidden_size"] % cfg["num_attention_heads"]:
            raise UnsupportedModelError("hidden_size is not a multiple of num_attention_heads")
        id2label = tuple(sorted((int(k), str(v)) for k, v in (cfg.get("id2label") or {}).items()))
        num_labels = 0
        if arch in _CLASSIFIER_ARCHS:
            num_labels = int(cfg.get("num_labels") or len(id2label) or 2)
        st = cfg.get("sentence_transformers") or {}
        ce_act = st.get("activation_fn") or cfg.get("sbert_ce_default_activation_function")
        mdims = cfg.get("matryoshka_dimensions")
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=int(cfg["num_attention_heads"]),
            intermediate_size=int(cfg["intermediate_size"]),
            max_position_embeddings=int(cfg["max_position_embeddings"]),
            type_vocab_size=int(cfg.get("type_vocab_size", 2)),
            hidden_act=act,
            layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
            pad_token_id=int(cfg.get("pad_token_id") or 0),
            family=family,
            architecture=arch,
            num_labels=num_labels,
            problem_type=cfg.get("problem_type"),
            id2label=id2label,
            cross_encoder_activation=ce_act,
            matryoshka_dimensions=tuple(int(d) for d in mdims) if mdims else None,
            is_matryoshka=bool(cfg.get("is_matryoshka", False) or mdims),
        )


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype: jnp.dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # Statistics in f32 whatever the activation dtype; BERT's eps (1e-12) is below bf16's
        # resolution, so a bf16 variance would lose it.
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


def _init(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    return (0.02 * jax.random.normal(rngs.params(), shape)).astype(dtype)


class BertLayer(nnx.Module):
    """One post-LayerNorm transformer block: self-attention, then the MLP."""

    def __init__(self, cfg: BertConfig, dtype: jnp.dtype, rngs: nnx.Rngs):
        d, n, h, f = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size
        # Q, K and V in one weight so the projection is a single matmul.
        self.w_qkv = nnx.Param(_init(rngs, (d, 3, n, h), dtype))  # [D, 3, N, H]
        self.b_qkv = nnx.Param(jnp.zeros((3, n, h), dtype))
        self.w_o = nnx.Param(_init(rngs, (n, h, d), dtype))  # [N, H, D]
        self.b_o = nnx.Param(jnp.zeros((d,), dtype))
        self.ln_attn = LayerNorm(d, cfg.layer_norm_eps, dtype)
        self.w_in = nnx.Param(_init(rngs, (d, f), dtype))  # [D, F]
        self.b_in = nnx.Param(jnp.zeros((f,), dtype))
        self.w_out = nnx.Param(_init(rngs, (f, d), dtype))  # [F, D]
        self.b_out = nnx.Param(jnp.zeros((d,), dtype))
        self.ln_mlp = LayerNorm(d, cfg.layer_norm_eps, dtype)
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.scale = 1.0 / float(np.sqrt(h))

    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        # x: [S, T, D]; key_mask: bool[S, T], True for a real token
        # Projections as plain [S*T, in] @ [in, out] matmuls (the weights' row-major layouts
        # make these reshapes free): as 3-D einsums XLA:CPU transposed weights and activations
        # on every step (~15% of the layer at S=256, T=32).
        s, t, d = x.shape
        n, h = self.w_o.shape[0], self.w_o.shape[1]
        rows = x.reshape(s * t, d)
        qkv = rows @ self.w_qkv[...].reshape(d, -1) + self.b_qkv[...].reshape(-1)
        qkv = qkv.reshape(s, t, 3, n, h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [S, T, N, H] each
        scores = jnp.einsum("sqnh,sknh->snqk", q, k).astype(jnp.float32) * self.scale
        scores = jnp.where(key_mask[:, None, None, :], scores, _MASKED)
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)  # [S, N, T, T]
        ctx = jnp.einsum("snqk,sknh->sqnh", probs, v)  # [S, T, N, H]
        attn = ctx.reshape(s * t, n * h) @ self.w_o[...].reshape(n * h, d) + self.b_o[...]
        rows = self.ln_attn(rows + attn)
        mlp = self.act(rows @ self.w_in[...] + self.b_in[...]) @ self.w_out[...] + self.b_out[...]
        return self.ln_mlp(rows + mlp).reshape(s, t, d)


class BertModel(nnx.Module):
    """Embeddings + encoder stack; ``__call__`` returns the last hidden states ``[S, T, D]``."""

    def __init__(self, cfg: BertConfig, dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.cfg = cfg
        d = cfg.hidden_size
        self.word_embeddings = nnx.Param(_init(rngs, (cfg.vocab_size, d), dtype))  # [V, D]
        self.position_embeddings = nnx.Param(_init(rngs, (cfg.max_position_embeddings, d), dtype))
        # A model without token types (type_vocab_size 0) gets one all-zero row.
        n_types = cfg.type_vocab_size
        self.token_type_embeddings = nnx.Param(
            _init(rngs, (n_types, d), dtype) if n_types else jnp.zeros((1, d), dtype))
        self.ln_emb = LayerNorm(d, cfg.layer_norm_eps, dtype)
        self.layers = nnx.List([BertLayer(cfg, dtype, rngs) for _ in range(cfg.num_hidden_layers)])

    def positions(self, input_ids: jax.Array, key_mask: jax.Array) -> jax.Array:
        """Position ids ``i32[S, T]``; RoBERTa-style models count only non-pad tokens."""
        if self.cfg.family == "roberta":
            pad = self.cfg.pad_token_id
            counted = (key_mask & (input_ids != pad)).astype(jnp.int32)
            return jnp.cumsum(counted, axis=1) * counted + pad
        t = input_ids.shape[1]
        return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), input_ids.shape)

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array,
                 lengths: jax.Array) -> jax.Array:
        """input_ids, token_type_ids: i32[S, T] right-padded; lengths: i32[S] -> [S, T, D]."""
        t = input_ids.shape[1]
        key_mask = jnp.arange(t, dtype=jnp.int32)[None, :] < lengths[:, None]  # [S, T]
        x = (
            self.word_embeddings[...][input_ids]
            + self.position_embeddings[...][self.positions(input_ids, key_mask)]
            + self.token_type_embeddings[...][token_type_ids]
        )
        x = self.ln_emb(x)
        for layer in self.layers:
            x = layer(x, key_mask)
        return x


class BertForSequenceClassification(nnx.Module):
    """Encoder + classification head; ``__call__`` returns raw logits ``f32[S, L]``.

    The activation (sigmoid/softmax/identity) is not applied here: ``models.pooling`` resolves
    it from the config and applies it per request, because the API can ask for raw logits.
    """

    def __init__(self, cfg: BertConfig, dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.cfg = cfg
        self.encoder = BertModel(cfg, dtype, rngs)
        d, n_labels = cfg.hidden_size, cfg.num_labels
        # BERT: pooler dense; RoBERTa: classifier.dense. Both are dense + tanh on token 0.
        self.w_pool = nnx.Param(_init(rngs, (d, d), dtype))  # [D, D]
        self.b_pool = nnx.Param(jnp.zeros((d,), dtype))
        self.w_cls = nnx.Param(_init(rngs, (d, n_labels), dtype))  # [D, L]
        self.b_cls = nnx.Param(jnp.zeros((n_labels,), dtype))

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array,
                 lengths: jax.Array) -> jax.Array:
        hidden = self.encoder(input_ids, token_type_ids, lengths)  # [S, T, D]
        first = jnp.tanh(hidden[:, 0] @ self.w_pool[...] + self.b_pool[...])  # [S, D]
        return (first @ self.w_cls[...] + self.b_cls[...]).astype(jnp.float32)  # [S, L]


# ----------------------------------------------------------------------------- loading


def is_encoder_dir(path: str | Path) -> bool:
    """Whether ``path`` is an HF directory whose ``config.json`` names a BERT-family
    ``model_type`` (whether this module can run it is ``read_config``'s call)."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        return False
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(cfg, dict) and cfg.get("model_type") in _FAMILIES


def read_config(model_dir: str | Path) -> BertConfig:
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise UnsupportedModelError(f"{model_dir} has no config.json")
    return BertConfig.from_hf(json.loads(path.read_text()))


def _read_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UnsupportedModelError(f"{model_dir} has no .safetensors weights")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


class _Weights:
    """Name lookup over a checkpoint that tolerates the task prefix and old LayerNorm names."""

    def __init__(self, tensors: dict[str, np.ndarray], family: str, dtype: jnp.dtype):
        self.tensors = tensors
        self.dtype = dtype
        self.prefixes = ("", f"{family}.", "bert.", "roberta.")
        self.used: set[str] = set()

    def get(self, name: str) -> np.ndarray:
        candidates = [name]
        if name.endswith("LayerNorm.weight"):
            candidates.append(name[: -len("weight")] + "gamma")
        if name.endswith("LayerNorm.bias"):
            candidates.append(name[: -len("bias")] + "beta")
        for prefix in self.prefixes:
            for cand in candidates:
                if prefix + cand in self.tensors:
                    self.used.add(prefix + cand)
                    return self.tensors[prefix + cand]
        raise UnsupportedModelError(f"checkpoint is missing tensor {name!r}")

    def set(self, var: nnx.Variable, value: np.ndarray) -> None:
        want = tuple(var.get_value().shape)
        if tuple(value.shape) != want:
            raise UnsupportedModelError(f"tensor shape {value.shape} does not match {want}")
        var.set_value(jnp.asarray(value, dtype=self.dtype))


def _load_encoder(model: BertModel, w: _Weights) -> None:
    cfg = model.cfg
    d, n, h = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    w.set(model.word_embeddings, w.get("embeddings.word_embeddings.weight"))
    w.set(model.position_embeddings, w.get("embeddings.position_embeddings.weight"))
    if cfg.type_vocab_size > 0:
        w.set(model.token_type_embeddings, w.get("embeddings.token_type_embeddings.weight"))
    w.set(model.ln_emb.scale, w.get("embeddings.LayerNorm.weight"))
    w.set(model.ln_emb.bias, w.get("embeddings.LayerNorm.bias"))
    for i, layer in enumerate(model.layers):
        p = f"encoder.layer.{i}."
        # torch Linear stores [out, in]; we keep [in, out] so activations multiply on the left.
        qkv = [w.get(f"{p}attention.self.{m}.weight").T.reshape(d, n, h)
               for m in ("query", "key", "value")]
        w.set(layer.w_qkv, np.stack(qkv, axis=1))
        w.set(layer.b_qkv, np.stack([w.get(f"{p}attention.self.{m}.bias").reshape(n, h)
                                     for m in ("query", "key", "value")]))
        w.set(layer.w_o, w.get(f"{p}attention.output.dense.weight").T.reshape(n, h, d))
        w.set(layer.b_o, w.get(f"{p}attention.output.dense.bias"))
        w.set(layer.ln_attn.scale, w.get(f"{p}attention.output.LayerNorm.weight"))
        w.set(layer.ln_attn.bias, w.get(f"{p}attention.output.LayerNorm.bias"))
        w.set(layer.w_in, w.get(f"{p}intermediate.dense.weight").T)
        w.set(layer.b_in, w.get(f"{p}intermediate.dense.bias"))
        w.set(layer.w_out, w.get(f"{p}output.dense.weight").T)
        w.set(layer.b_out, w.get(f"{p}output.dense.bias"))
        w.set(layer.ln_mlp.scale, w.get(f"{p}output.LayerNorm.weight"))
        w.set(layer.ln_mlp.bias, w.get(f"{p}output.LayerNorm.bias"))


def _load_classifier(model: BertForSequenceClassification, w: _Weights) -> None:
    _load_encoder(model.encoder, w)
    if model.cfg.family == "roberta":
        w.set(model.w_pool, w.get("classifier.dense.weight").T)
        w.set(model.b_pool, w.get("classifier.dense.bias"))
        w.set(model.w_cls, w.get("classifier.out_proj.weight").T)
        w.set(model.b_cls, w.get("classifier.out_proj.bias"))
    else:
        w.set(model.w_pool, w.get("pooler.dense.weight").T)
        w.set(model.b_pool, w.get("pooler.dense.bias"))
        w.set(model.w_cls, w.get("classifier.weight").T)
        w.set(model.b_cls, w.get("classifier.bias"))


def load_bert(
    model_dir: str | Path, dtype: jnp.dtype = jnp.float32
) -> BertModel | BertForSequenceClassification:
    """Build the model named by ``config.json`` and fill it from the safetensors files.

    Raises ``UnsupportedModelError`` for a config or checkpoint this module cannot run. Weights
    are cast to ``dtype``; tensors the model does not use (an MLM head, BERT's pooler in an
    embedding checkpoint) are ignored.
    """
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    tensors = _read_tensors(model_dir)
    weights = _Weights(tensors, cfg.family, dtype)
    # Abstract construction: no random init of arrays we are about to overwrite.
    if cfg.is_classifier:
        clf = nnx.eval_shape(lambda: BertForSequenceClassification(cfg, dtype))
        _load_classifier(clf, weights)
        return clf
    enc = nnx.eval_shape(lambda: BertModel(cfg, dtype))
    _load_encoder(enc, weights)
    return enc
