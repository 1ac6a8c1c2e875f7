"""A dense (unpaged) attention path for one sequence, plugged into the same model code.

``write_fn`` returns this step's K/V themselves as the "cache", and ``attn_fn`` runs plain causal
softmax attention over them. Running a whole sequence through the model this way is the dense
full forward pass that paged prefill + decode must reproduce.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dense_write(k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array,
                slot_mapping: jax.Array) -> tuple[jax.Array, jax.Array]:
    return k, v  # [T, K, H]


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, page_table: jax.Array,
                    kv_lens: jax.Array, cu_q_lens: jax.Array, *, sm_scale: float,
                    sliding_window: int | None = None, soft_cap: float | None = None) -> jax.Array:
    t, n, _h = q.shape
    kh = k.shape[1]
    g = n // kh
    kk = jnp.repeat(k, g, axis=1)  # [T, N, H]
    vv = jnp.repeat(v, g, axis=1)
    s = jnp.einsum("qnh,knh->nqk", q.astype(jnp.float32), kk.astype(jnp.float32)) * sm_scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    mask = j <= i
    if sliding_window is not None:
        mask &= j > i - sliding_window
    s = jnp.where(mask[None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("nqk,knh->qnh", p, vv.astype(jnp.float32)).astype(q.dtype)
