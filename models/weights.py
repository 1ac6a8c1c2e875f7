"""HF tensor names → our parameters, for every decoder family.

Input: an iterator of ``(hf_name, float32 numpy [out, in])`` from any source (safetensors, GGUF
already mapped to HF names). Output: the abstract model's parameters filled in place, each placed on
device by ``place`` (the sharding hook: default ``jax.device_put``). Linears are transposed once
here; q/k/v are fused into ``[D, K, G + 2, H]`` and gate/up into ``[D, 2, F]``, so those tensors
wait in ``pending`` until their partners arrive (at most one layer's worth in practice).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ModelConfig

Place = Callable[[str, tuple[str | None, ...], np.ndarray], jax.Array]

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_NORMS = {
    "input_layernorm.weight": "input_norm.weight",
    "post_attention_layernorm.weight": "post_attn_norm.weight",
    "pre_feedforward_layernorm.weight": "pre_ffw_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
}
_GROUPS = {
    "self_attn.q_proj.weight": ("qkv", 0), "self_attn.k_proj.weight": ("qkv", 1),
    "self_attn.v_proj.weight": ("qkv", 2),
    "self_attn.q_proj.bias": ("qkv_bias", 0), "self_attn.k_proj.bias": ("qkv_bias", 1),
    "self_attn.v_proj.bias": ("qkv_bias", 2),
    "mlp.gate_proj.weight": ("gate_up", 0), "mlp.up_proj.weight": ("gate_up", 1),
}

# Every HF parameter name ``load_weights`` reads: the global ones, and those of each layer
# (after "model.layers.N."). Sources that rename tensors (models.gguf) map onto these.
HF_GLOBAL_WEIGHTS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
HF_LAYER_WEIGHTS = (*_LAYER_NORMS, *_GROUPS, "self_attn.o_proj.weight", "mlp.down_proj.weight")


def default_place(path: str, axes: tuple[str | None, ...], value: np.ndarray) -> jax.Array:
    return jax.device_put(value)


def _get_param(model: nnx.Module, path: str) -> nnx.Param:
    obj: Any = model
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    if not isinstance(obj, nnx.Param):
        raise KeyError(path)
    return obj


def _fuse(kind: str, parts: dict[int, np.ndarray], cfg: ModelConfig) -> np.ndarray:
    k, g, h, d = cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim, cfg.hidden_size
    if kind == "qkv":  # [N*H, D], [K*H, D], [K*H, D] → [D, K, G+2, H]
        q = parts[0].T.reshape(d, k, g, h)
        kk = parts[1].T.reshape(d, k, 1, h)
        v = parts[2].T.reshape(d, k, 1, h)
        return np.concatenate([q, kk, v], axis=2)
    if kind == "qkv_bias":  # [N*H], [K*H], [K*H] → [K, G+2, H]
        return np.concatenate([parts[0].reshape(k, g, h), parts[1].reshape(k, 1, h),
                               parts[2].reshape(k, 1, h)], axis=1)
    # gate_up: [F, D] x2 → [D, 2, F]
    return np.stack([parts[0].T, parts[1].T], axis=1)


def load_weights(model: nnx.Module, cfg: ModelConfig,
                 tensors: Iterable[tuple[str, np.ndarray]], dtype: Any,
                 place: Place = default_place) -> None:
    """Fill every parameter of ``model`` (usually built under ``nnx.eval_shape``)."""
    np_dtype = jnp.dtype(dtype)
    filled: set[str] = set()
    pending: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    n_parts = {"qkv": 3, "qkv_bias": 3, "gate_up": 2}

    def put(path: str, value: np.ndarray) -> None:
        p = _get_param(model, path)
        if tuple(p.shape) != value.shape:
            raise ValueError(f"weight {path}: expected shape {tuple(p.shape)}, got {value.shape}")
        axes = p.get_metadata().get("logical_axes", (None,) * value.ndim)
        p.set_value(place(path, axes, np.ascontiguousarray(value.astype(np_dtype))))
        filled.add(path)

    for name, arr in tensors:
        if name in ("lm_head.weight",) and cfg.tie_word_embeddings:
            continue
        if name == "model.embed_tokens.weight":
            put("embed.weight", arr)
        elif name == "lm_head.weight":
            put("lm_head.weight", arr)
        elif name == "model.norm.weight":
            put("norm.weight", arr)
        elif m := _LAYER.match(name):
            i, rest = int(m.group(1)), m.group(2)
            if rest in _LAYER_NORMS:
                put(f"layers.{i}.{_LAYER_NORMS[rest]}", arr)
            elif rest == "self_attn.o_proj.weight":  # [D, N*H] → [N, H, D]
                put(f"layers.{i}.attn.o", arr.T.reshape(cfg.num_heads, cfg.head_dim, -1))
            elif rest == "mlp.down_proj.weight":
                put(f"layers.{i}.mlp.down", arr.T)
            elif rest in _GROUPS:
                kind, slot = _GROUPS[rest]
                parts = pending.setdefault((i, kind), {})
                parts[slot] = arr
                if len(parts) == n_parts[kind]:
                    owner = "mlp" if kind == "gate_up" else "attn"
                    put(f"layers.{i}.{owner}.{kind}", _fuse(kind, parts, cfg))
                    del pending[(i, kind)]
            elif rest.endswith("rotary_emb.inv_freq"):
                continue
            else:
                raise ValueError(f"unexpected weight {name}")
        elif name.startswith("model.") or name.startswith("lm_head"):
            raise ValueError(f"unexpected weight {name}")
    if pending:
        missing = ", ".join(f"layer {i} {kind}" for i, kind in pending)
        raise ValueError(f"incomplete fused weights: {missing}")
    expected = {path for path, _ in _param_paths(model)}
    if missing_paths := sorted(expected - filled):
        raise ValueError(f"checkpoint lacks {len(missing_paths)} weights, e.g. {missing_paths[:3]}")


def _param_paths(model: nnx.Module) -> list[tuple[str, nnx.Param]]:
    out = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param):
            out.append((".".join(str(p) for p in path), node))
    return out
