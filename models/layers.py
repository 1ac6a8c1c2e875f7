"""Building blocks shared by the decoder families: norms, rotary embeddings, attention, MLP.

Parameters carry logical axis names (metadata ``logical_axes``) that ``sharding.rules`` maps onto a
mesh; nothing here names a mesh axis. Weights are stored ready for ``x @ W`` einsums; the loaders
transpose HF's ``[out, in]`` linears once at load time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ModelConfig
from models.inputs import AttentionFn, StepInputs, WriteKVFn
from ops import native
from ops.backend import LinearBackend


def param(shape: tuple[int, ...], dtype: Any, axes: tuple[str | None, ...]) -> nnx.Param:
    """A zero-initialised parameter with logical axes; loaders overwrite the value."""
    return nnx.Param(jnp.zeros(shape, dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
    """RMSNorm in float32. Gemma's convention scales by ``1 + w`` (``plus_one``)."""

    def __init__(self, dim: int, eps: float, dtype: Any, plus_one: bool = False,
                 axis_name: str = "norm") -> None:
        self.weight = param((dim,), dtype, (axis_name,))
        self.eps = eps
        self.plus_one = plus_one

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        w = self.weight[...].astype(jnp.float32)
        return (xf * (1.0 + w if self.plus_one else w)).astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> np.ndarray:
    """Inverse frequencies [H/2] for HF's rotate-half RoPE, with llama3/linear scaling."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if not scaling:
        return inv.astype(np.float32)
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return (inv / factor).astype(np.float32)
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        out = np.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        out = np.where(medium, (1 - smooth) * out / factor + smooth * out, out)
        return out.astype(np.float32)
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: llama3, linear)")


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: Any) -> jax.Array:
    """Rotate-half RoPE. x: [T, heads, H], positions: i32[T]."""
    freqs = jnp.asarray(inv_freq, jnp.float32)
    ang = positions.astype(jnp.float32)[:, None] * freqs[None, :]  # [T, H/2]
    cos, sin = jnp.cos(ang)[:, None, :], jnp.sin(ang)[:, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    """Paged self-attention for one layer: fused qkv → (q/k norm) → rope → write KV → attend → o.

    ``qkv`` is laid out ``[D, K, G + 2, H]``: for each kv head, its G query heads then its key and
    value. Sharding the K axis therefore keeps every GQA group on one shard.
    """

    def __init__(self, cfg: ModelConfig, layer: int, dtype: Any, attn_fn: AttentionFn,
                 write_fn: WriteKVFn) -> None:
        d, k, g, h = cfg.hidden_size, cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim
        self.qkv = param((d, k, g + 2, h), dtype, ("embed", "kv_heads", None, "head_dim"))
        self.qkv_bias = (param((k, g + 2, h), dtype, ("kv_heads", None, "head_dim"))
                         if cfg.attention_bias else None)
        self.o = param((k * g, h, d), dtype, ("heads", "head_dim", "embed"))
        self.q_norm = RMSNorm(h, cfg.rms_norm_eps, dtype, cfg.is_gemma, "head_dim") \
            if cfg.qk_norm else None
        self.k_norm = RMSNorm(h, cfg.rms_norm_eps, dtype, cfg.is_gemma, "head_dim") \
            if cfg.qk_norm else None
        # A tuple, not an array: a static constant of the graph, never a pytree leaf.
        self.inv_freq = tuple(float(f) for f in rope_inv_freq(
            h, cfg.layer_rope_theta(layer), cfg.layer_rope_scaling(layer)))
        self.window = cfg.layer_window(layer)
        self.scale = cfg.attn_scale
        self.soft_cap = cfg.attn_logit_softcapping
        self.group = g
        self.head_dim = h
        self.attn_fn = attn_fn
        self.write_fn = write_fn
        # Set by ``pack_linears``: qkv and o are then packed for this matmul (ops.backend).
        self.linear: Callable[..., jax.Array] | None = None

    def __call__(self, x: jax.Array, kv: tuple[jax.Array, jax.Array],
                 inp: StepInputs) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        if self.linear is None:
            qkv = jnp.einsum("td,dkjh->tkjh", x, self.qkv[...])  # [T, K, G+2, H]
        else:
            qkv = self.linear(x, self.qkv[...]).reshape(  # packed [(K*(G+2)*H)/16, D, 16]
                x.shape[0], -1, self.group + 2, self.head_dim)
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias[...]
        t, k, _, h = qkv.shape
        q = qkv[:, :, : self.group].reshape(t, k * self.group, h)  # [T, N, H]
        key, value = qkv[:, :, self.group], qkv[:, :, self.group + 1]  # [T, K, H]
        if self.q_norm is not None and self.k_norm is not None:
            q, key = self.q_norm(q), self.k_norm(key)
        q = apply_rope(q, inp.positions, self.inv_freq)
        key = apply_rope(key, inp.positions, self.inv_freq)
        k_cache, v_cache = self.write_fn(kv[0], kv[1], key, value, inp.slot_mapping)
        out = self.attn_fn(q, k_cache, v_cache, inp.page_table, inp.kv_lens, inp.cu_q_lens,
                           sm_scale=self.scale, sliding_window=self.window,
                           soft_cap=self.soft_cap)  # [T, N, H]
        # As one [T, N*H] @ [N*H, D] matmul: the 3-D einsum made XLA:CPU transpose the whole o
        # weight on every step to match the attention output's layout (1.3 MB per layer).
        if self.linear is not None:
            return self.linear(out.reshape(t, -1), self.o[...]), (k_cache, v_cache)
        o = self.o[...]
        y = out.reshape(t, -1) @ o.reshape(-1, o.shape[-1])
        return y, (k_cache, v_cache)


class GatedMLP(nnx.Module):
    """SwiGLU (llama) or GeGLU-tanh (gemma) with gate and up fused as ``[D, 2, F]``."""

    def __init__(self, cfg: ModelConfig, dtype: Any) -> None:
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_up = param((d, 2, f), dtype, ("embed", None, "mlp"))
        self.down = param((f, d), dtype, ("mlp", "embed"))
        act = cfg.hidden_act
        self.act: Callable[[jax.Array], jax.Array]
        if act == "silu":
            self.act = jax.nn.silu
        elif act in ("gelu_pytorch_tanh", "gelu_tanh"):
            self.act = lambda v: jax.nn.gelu(v, approximate=True)
        elif act == "gelu":
            self.act = lambda v: jax.nn.gelu(v, approximate=False)
        else:
            raise ValueError(f"unsupported hidden_act {act!r}")
        # Set by ``pack_linears``: gate_up and down are then packed for this matmul.
        self.linear: Callable[..., jax.Array] | None = None

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.linear is not None:
            gu = self.linear(x, self.gate_up[...]).reshape(x.shape[0], 2, -1)
            return self.linear(self.act(gu[:, 0]) * gu[:, 1], self.down[...])
        gu = jnp.einsum("td,djf->tjf", x, self.gate_up[...])  # [T, 2, F]
        return (self.act(gu[:, 0]) * gu[:, 1]) @ self.down[...]


class Embedding(nnx.Module):
    def __init__(self, vocab: int, dim: int, dtype: Any) -> None:
        self.weight = param((vocab, dim), dtype, ("vocab", "embed"))
        # Set by ``pack_linears``: the table is then packed for ``linear`` (the LM head) and
        # ``rows`` reads embeddings back out of the packing.
        self.linear: Callable[..., jax.Array] | None = None
        self.rows: Callable[..., jax.Array] | None = None
        self.dtype = dtype
        self.dim = dim

    def __call__(self, ids: jax.Array) -> jax.Array:
        if self.rows is not None:
            # [:, :dim]: a Q8_0 packing's rows come zero-padded to whole 32-row blocks.
            return self.rows(self.weight[...], ids)[:, : self.dim].astype(self.dtype)
        return jnp.take(self.weight[...], ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        if self.linear is not None:
            return self.linear(x, self.weight[...])
        # einsum against [V, D] avoids a transposed copy of a tied table and was ~2x faster than
        # x @ W[D, V] on XLA:CPU at batch >= 8 (model_assets.md, LM head probe).
        return jnp.einsum("sd,vd->sv", x, self.weight[...])


def pack_linears(model: nnx.Module, backend: LinearBackend) -> int:
    """Pack, once at load, the weights of every ``Attention`` (qkv, o), ``GatedMLP`` (gate_up,
    down) and ``Embedding`` (lookup table and LM head) of ``model`` into ``backend``'s layout,
    and make those modules call ``backend.linear`` instead of their einsums. A module whose
    output width the packing cannot take (``ops.native.packable``) keeps its einsums. Single
    device only (the packed layout has no logical axes to shard). Returns the modules packed."""
    packed = 0
    for _, m in nnx.iter_graph(model):
        if isinstance(m, Attention):
            qkv, o = m.qkv[...], m.o[...]
            mats = (qkv.reshape(qkv.shape[0], -1), o.reshape(-1, o.shape[-1]))
            if all(native.packable(w) for w in mats):
                m.qkv.set_value(backend.pack(mats[0]))
                m.o.set_value(backend.pack(mats[1]))
                m.linear = backend.linear
                packed += 1
        elif isinstance(m, GatedMLP):
            gu, down = m.gate_up[...], m.down[...]
            gu = gu.reshape(gu.shape[0], -1)
            if native.packable(gu) and native.packable(down):
                m.gate_up.set_value(backend.pack(gu))
                m.down.set_value(backend.pack(down))
                m.linear = backend.linear
                packed += 1
        elif isinstance(m, Embedding):
            w = m.weight[...]
            if native.packable(w.T):
                m.weight.set_value(backend.pack_rows(w))
                m.linear, m.rows = backend.linear, backend.rows
                packed += 1
    return packed
