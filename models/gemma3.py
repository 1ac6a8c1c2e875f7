"""Gemma 3 (text): interleaved sliding-window (local rope base) and global layers.

Differences from Llama that live here: embeddings scaled by sqrt(D), four norms per layer (the
attention and MLP outputs are normed before the residual add), norms scale by ``1 + w``, q/k
norms, GeGLU-tanh MLP, query scaling by ``query_pre_attn_scalar ** -0.5`` and a tied LM head.
Per-layer window and rope base come from ``ModelConfig.layer_window`` / ``layer_rope_theta``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.inputs import AttentionFn, KVCache, StepInputs, WriteKVFn
from models.layers import Attention, Embedding, GatedMLP, RMSNorm


class Gemma3Layer(nnx.Module):
    def __init__(self, cfg: ModelConfig, i: int, dtype: Any, attn_fn: AttentionFn,
                 write_fn: WriteKVFn) -> None:
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_norm = RMSNorm(d, eps, dtype, plus_one=True)
        self.attn = Attention(cfg, i, dtype, attn_fn, write_fn)
        self.post_attn_norm = RMSNorm(d, eps, dtype, plus_one=True)
        self.pre_ffw_norm = RMSNorm(d, eps, dtype, plus_one=True)
        self.post_ffw_norm = RMSNorm(d, eps, dtype, plus_one=True)
        self.mlp = GatedMLP(cfg, dtype)

    def __call__(self, x: jax.Array, kv: tuple[jax.Array, jax.Array],
                 inp: StepInputs) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        a, kv = self.attn(self.input_norm(x), kv, inp)
        x = x + self.post_attn_norm(a)
        return x + self.post_ffw_norm(self.mlp(self.pre_ffw_norm(x))), kv


class Gemma3Model(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: Any, attn_fn: AttentionFn,
                 write_fn: WriteKVFn) -> None:
        self.cfg = cfg
        self.embed = Embedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nnx.List(
            [Gemma3Layer(cfg, i, dtype, attn_fn, write_fn) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, plus_one=True)
        self.lm_head = None if cfg.tie_word_embeddings else Embedding(
            cfg.vocab_size, cfg.hidden_size, dtype)

    def __call__(self, kv_caches: KVCache, inp: StepInputs) -> tuple[jax.Array, KVCache]:
        x = self.embed(inp.token_ids)
        # HF multiplies by sqrt(D) rounded to the activation dtype.
        x = x * jnp.asarray(self.cfg.hidden_size**0.5, dtype=x.dtype)
        new_caches = []
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            x, kv = layer(x, kv, inp)
            new_caches.append(kv)
        return self.norm(x), new_caches

    def logits(self, h: jax.Array) -> jax.Array:
        head = self.embed if self.lm_head is None else self.lm_head
        out = head.attend(h).astype(jnp.float32)
        cap = self.cfg.final_logit_softcapping
        return out if cap is None else cap * jnp.tanh(out / cap)
