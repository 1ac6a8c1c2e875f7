"""The BERT family of bidirectional encoders in Flax NNX: BERT, RoBERTa, XLM-RoBERTa.

Used by ``serving.engine.pooling_runner`` for embeddings (``BertModel`` + a pooler from
``models.pooling``) and cross-encoder scores (``BertForSequenceClassification`` and the RoBERTa
equivalent). Loaded from a Hugging Face directory: ``config.json`` + ``model.safetensors``.

Step layout: the decoders' packed ``StepInputs`` (``models.inputs``): whole prompts back to back
on one token axis, grouped by ``cu_q_lens``; attention is the non-causal, pageless path of the ops
contract (``ops.attention.ragged_encoder_attention_reference``), so a token attends to every token
of its own sequence and nothing else, and what a sequence computes does not depend on its
neighbours (up to float summation order). Padding tokens produce finite garbage the runner drops.
Parameters carry logical axes (``sharding.rules``), as the decoders' do.

Axis letters: S sequences, T tokens (packed, padded), D model dim, N heads, H head dim, F MLP dim,
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.inputs import EncoderAttentionFn, KVCache, StepInputs
from ops import native
from ops.attention import ragged_encoder_attention_reference
from ops.backend import LinearBackend

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
        self.scale = nnx.Param(jnp.ones((dim,), dtype), logical_axes=("norm",))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype), logical_axes=("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # Statistics in f32 whatever the activation dtype; BERT's eps (1e-12) is below bf16's
        # resolution, so a bf16 variance would lose it.
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: jnp.dtype,
           axes: tuple[str | None, ...], zeros: bool = False) -> nnx.Param:
    """A parameter with logical axes (``sharding.rules``); loaders overwrite the value."""
    value = jnp.zeros(shape, dtype) if zeros else \
        (0.02 * jax.random.normal(rngs.params(), shape)).astype(dtype)
    return nnx.Param(value, logical_axes=axes)


class BertLayer(nnx.Module):
    """One post-LayerNorm transformer block: self-attention, then the MLP."""

    def __init__(self, cfg: BertConfig, dtype: jnp.dtype, rngs: nnx.Rngs,
                 attn_fn: EncoderAttentionFn):
        d, n, h, f = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size
        # Q, K and V in one weight so the projection is a single matmul.
        self.w_qkv = _param(rngs, (d, 3, n, h), dtype, ("embed", None, "heads", "head_dim"))
        self.b_qkv = _param(rngs, (3, n, h), dtype, (None, "heads", "head_dim"), zeros=True)
        self.w_o = _param(rngs, (n, h, d), dtype, ("heads", "head_dim", "embed"))
        self.b_o = _param(rngs, (d,), dtype, ("norm",), zeros=True)
        self.ln_attn = LayerNorm(d, cfg.layer_norm_eps, dtype)
        self.w_in = _param(rngs, (d, f), dtype, ("embed", "mlp"))
        self.b_in = _param(rngs, (f,), dtype, ("mlp",), zeros=True)
        self.w_out = _param(rngs, (f, d), dtype, ("mlp", "embed"))
        self.b_out = _param(rngs, (d,), dtype, ("norm",), zeros=True)
        self.ln_mlp = LayerNorm(d, cfg.layer_norm_eps, dtype)
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.scale = 1.0 / float(np.sqrt(h))
        self.heads, self.head_dim = n, h
        self.attn_fn = attn_fn
        # Set by ``pack_encoder_linears``: the four weights are then packed for this matmul
        # (``ops.backend.LinearBackend``) and no longer have their logical shapes.
        self.linear: Callable[..., jax.Array] | None = None

    def _matmul(self, x: jax.Array, w: nnx.Param) -> jax.Array:
        """``x [T, in] @ w`` viewed as ``[in, out]``: the packed GEMM, or a plain matmul (the
        weights' row-major layouts make the reshape free; as 3-D einsums XLA:CPU transposed
        weights and activations on every step)."""
        if self.linear is not None:
            return self.linear(x, w[...])
        return x @ w[...].reshape(x.shape[1], -1)

    def __call__(self, x: jax.Array, inp: StepInputs) -> jax.Array:
        # x: [T, D], tokens packed by sequence (inp.cu_q_lens).
        t = x.shape[0]
        n, h = self.heads, self.head_dim
        qkv = self._matmul(x, self.w_qkv) + self.b_qkv[...].reshape(-1)
        qkv = qkv.reshape(t, 3, n, h)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # [T, N, H] each
        ctx = self.attn_fn(q, k, v, inp.cu_q_lens, sm_scale=self.scale)  # [T, N, H]
        attn = self._matmul(ctx.reshape(t, n * h), self.w_o) + self.b_o[...]
        x = self.ln_attn(x + attn)
        mlp = self.act(self._matmul(x, self.w_in) + self.b_in[...])
        return self.ln_mlp(x + (self._matmul(mlp, self.w_out) + self.b_out[...]))


class BertModel(nnx.Module):
    """Embeddings + encoder stack over a packed step (``models.inputs.StepInputs``).

    ``__call__(kv_caches, inp)`` has the decoders' signature so one runner drives both; an
    encoder keeps no KV cache (``kv_caches`` is ``[]`` and comes back unchanged) and every
    sequence of a step is a whole prompt starting at position 0.
    """

    def __init__(self, cfg: BertConfig, dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs | None = None, attn_fn: EncoderAttentionFn | None = None):
        rngs = rngs or nnx.Rngs(0)
        attn_fn = attn_fn or ragged_encoder_attention_reference
        self.cfg = cfg
        d = cfg.hidden_size
        self.word_embeddings = _param(rngs, (cfg.vocab_size, d), dtype, ("vocab", "embed"))
        self.position_embeddings = _param(rngs, (cfg.max_position_embeddings, d), dtype,
                                          (None, "embed"))
        # A model without token types (type_vocab_size 0) gets one all-zero row.
        n_types = cfg.type_vocab_size
        self.token_type_embeddings = _param(rngs, (max(n_types, 1), d), dtype, (None, "embed"),
                                            zeros=not n_types)
        self.ln_emb = LayerNorm(d, cfg.layer_norm_eps, dtype)
        self.layers = nnx.List([BertLayer(cfg, dtype, rngs, attn_fn)
                                for _ in range(cfg.num_hidden_layers)])

    def positions(self, inp: StepInputs) -> jax.Array:
        """Position ids ``i32[T]``; RoBERTa-style models count only non-pad tokens, from
        ``pad_token_id + 1`` (HF's ``create_position_ids_from_input_ids``), per sequence."""
        if self.cfg.family != "roberta":
            return jnp.asarray(inp.positions)
        pad = self.cfg.pad_token_id
        ids, cu = jnp.asarray(inp.token_ids), jnp.asarray(inp.cu_q_lens)
        t = jnp.arange(ids.shape[0], dtype=jnp.int32)
        counted = ((ids != pad) & (t < cu[-1])).astype(jnp.int32)
        total = jnp.cumsum(counted)
        seq = jnp.clip(jnp.searchsorted(cu[1:], t, side="right"), 0, cu.shape[0] - 2)
        before = (total - counted)[jnp.minimum(cu[seq], ids.shape[0] - 1)]  # at the seq start
        return (total - before) * counted + pad

    def __call__(self, kv_caches: KVCache, inp: StepInputs) -> tuple[jax.Array, KVCache]:
        """Last hidden states ``[T, D]`` (padding rows are finite garbage) and ``kv_caches``."""
        x = (
            self.word_embeddings[...][inp.token_ids]
            + self.position_embeddings[...][self.positions(inp)]
            + self.token_type_embeddings[...][inp.token_type_ids]
        )
        x = self.ln_emb(x)
        for layer in self.layers:
            x = layer(x, inp)
        return x, kv_caches


class BertForSequenceClassification(nnx.Module):
    """Encoder + classification head: ``__call__`` as ``BertModel``, ``classify`` on the first
    token of each sequence returns raw logits ``f32[S, L]``.

    The activation (sigmoid/softmax/identity) is not applied here: ``models.pooling`` resolves
    it from the config and applies it per request, because the API can ask for raw logits.
    """

    def __init__(self, cfg: BertConfig, dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs | None = None, attn_fn: EncoderAttentionFn | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.cfg = cfg
        self.encoder = BertModel(cfg, dtype, rngs, attn_fn)
        d, n_labels = cfg.hidden_size, cfg.num_labels
        # BERT: pooler dense; RoBERTa: classifier.dense. Both are dense + tanh on token 0.
        self.w_pool = _param(rngs, (d, d), dtype, ("embed", None))
        self.b_pool = _param(rngs, (d,), dtype, ("norm",), zeros=True)
        self.w_cls = _param(rngs, (d, n_labels), dtype, ("embed", None))
        self.b_cls = _param(rngs, (n_labels,), dtype, (None,), zeros=True)
        # Set by ``pack_encoder_linears``: w_pool is then packed (the classifier's few labels
        # are not a multiple of the panel width and keep their matmul).
        self.linear: Callable[..., jax.Array] | None = None

    def __call__(self, kv_caches: KVCache, inp: StepInputs) -> tuple[jax.Array, KVCache]:
        return self.encoder(kv_caches, inp)

    def classify(self, first: jax.Array) -> jax.Array:
        """[S, D] hidden states of each sequence's first token -> f32[S, L] logits."""
        pool = first @ self.w_pool[...] if self.linear is None else \
            self.linear(first, self.w_pool[...])
        pooled = jnp.tanh(pool + self.b_pool[...])
        return (pooled @ self.w_cls[...] + self.b_cls[...]).astype(jnp.float32)


def pack_encoder_linears(model: nnx.Module, backend: LinearBackend) -> int:
    """Pack, once at load, every ``BertLayer``'s projections (QKV, attention output, MLP in and
    out) and a classifier's pooler dense into ``backend``'s layout (``ops.backend``; the
    decoders' ``models.layers.pack_linears`` for BERT), and make those modules call
    ``backend.linear`` instead of their matmuls. A module whose widths the packing cannot take
    (``ops.native.packable``) keeps its matmuls. Single device only (the packed layout has no
    logical axes to shard). Returns the modules packed."""
    packed = 0
    for _, m in nnx.iter_graph(model):
        if isinstance(m, BertLayer):
            d = m.w_in.shape[0]
            mats = [(m.w_qkv, m.w_qkv[...].reshape(d, -1)), (m.w_o, m.w_o[...].reshape(-1, d)),
                    (m.w_in, m.w_in[...]), (m.w_out, m.w_out[...])]
            if all(native.packable(w) for _, w in mats):
                for var, w in mats:
                    var.set_value(backend.pack(w))
                m.linear = backend.linear
                packed += 1
        elif isinstance(m, BertForSequenceClassification) and native.packable(m.w_pool[...]):
            m.w_pool.set_value(backend.pack(m.w_pool[...]))
            m.linear = backend.linear
            packed += 1
    return packed


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
