"""Random-weight models with real architectures, for benchmarks where no checkpoint can reach
the machine (the lent GPU has no network). Weights are drawn on the device, one tensor at a
time, so an 8B model never passes through host memory.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.registry import LoadedModel, build_model, resolve_dtype
from models.testing import byte_tokenizer
from ops.backend import get_attention_fn

SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096,
                      intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                      head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
                      max_position_embeddings=8192, tie_word_embeddings=False,
                      eos_token_ids=(128001,)),
    # Gemma 3 12B's text tower: 5 sliding-window layers (1024) to each global one.
    "gemma3-12b": dict(model_type="gemma3_text", vocab_size=262208, hidden_size=3840,
                       intermediate_size=15360, num_layers=48, num_heads=16, num_kv_heads=8,
                       head_dim=256, rms_norm_eps=1e-6, rope_theta=1e6,
                       rope_scaling={"rope_type": "linear", "factor": 8.0},
                       max_position_embeddings=131072, tie_word_embeddings=True, qk_norm=True,
                       hidden_act="gelu_pytorch_tanh", rope_local_base_freq=10000.0,
                       sliding_window=1024,
                       sliding_layers=tuple((i + 1) % 6 != 0 for i in range(48)),
                       query_pre_attn_scalar=256.0, eos_token_ids=(1, 106)),
    # The device script's CPU dry run: the same code path in seconds.
    "tiny-llama": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                       max_position_embeddings=1024, tie_word_embeddings=True,
                       eos_token_ids=(1,)),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576,
                         intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
                         head_dim=64, rope_theta=100000.0, max_position_embeddings=8192,
                         tie_word_embeddings=True, eos_token_ids=(2,)),
}


def random_loaded(name: str, dtype: str = "auto", attention_backend: str = "auto",
                  seed: int = 0) -> LoadedModel:
    cfg = ModelConfig(**SHAPES[name])
    jdtype = resolve_dtype(dtype)
    attn = get_attention_fn(attention_backend)
    model = build_model(cfg, jdtype, attn.attention, attn.write_kv, abstract=True)
    key = jax.random.key(seed)
    for i, (_, node) in enumerate(nnx.iter_graph(model)):
        if isinstance(node, nnx.Param):
            shape = tuple(node.shape)
            k = jax.random.fold_in(key, i)
            if len(shape) == 1:
                val = jnp.ones(shape, jdtype)
            else:
                val = (jax.random.normal(k, shape, jnp.float32) * shape[0] ** -0.5).astype(jdtype)
            node.set_value(val)
    return LoadedModel(cfg, model, byte_tokenizer(), {}, f"random-{name}", "random", jdtype,
                       cfg.max_position_embeddings)
