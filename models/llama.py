"""Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2 with qkv bias, Qwen3 with q/k norm).

Pre-norm decoder: x += attn(norm(x)); x += mlp(norm(x)). The model consumes a ``StepInputs`` pytree
and an explicit KV cache, and returns final-normed hidden states plus the updated cache; the runner
selects the rows to sample and calls ``logits`` on them only.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.inputs import AttentionFn, KVCache, StepInputs, WriteKVFn
from models.layers import Attention, Embedding, GatedMLP, RMSNorm


class LlamaLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, i: int, dtype: Any, attn_fn: AttentionFn,
                 write_fn: WriteKVFn) -> None:
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.attn = Attention(cfg, i, dtype, attn_fn, write_fn)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = GatedMLP(cfg, dtype)

    def __call__(self, x: jax.Array, kv: tuple[jax.Array, jax.Array],
                 inp: StepInputs) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        a, kv = self.attn(self.input_norm(x), kv, inp)
        x = x + a
        return x + self.mlp(self.post_attn_norm(x)), kv


class LlamaModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: Any, attn_fn: AttentionFn,
                 write_fn: WriteKVFn) -> None:
        self.cfg = cfg
        self.embed = Embedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nnx.List(
            [LlamaLayer(cfg, i, dtype, attn_fn, write_fn) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Embedding(
            cfg.vocab_size, cfg.hidden_size, dtype)

    def __call__(self, kv_caches: KVCache, inp: StepInputs) -> tuple[jax.Array, KVCache]:
        """Hidden states [T, D] after the final norm, and the updated per-layer caches."""
        x = self.embed(inp.token_ids)  # [T, D]
        new_caches = []
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            x, kv = layer(x, kv, inp)
            new_caches.append(kv)
        return self.norm(x), new_caches

    def logits(self, h: jax.Array) -> jax.Array:
        """[S, D] → f32[S, V]."""
        head = self.embed if self.lm_head is None else self.lm_head
        return head.attend(h).astype(jnp.float32)
