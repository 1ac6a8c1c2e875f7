"""StepInputs: the device-side inputs of one model step, one registered pytree.

Built (padded, on the host) by ``serving.engine.model_runner`` and consumed by every model family
and ``ops`` attention. Shapes are padded to the step's bucket: T tokens, S sequences, W page-table
width. The metadata contract is the one in ``ops.attention``'s module docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import jax

# Fields are numpy while the runner builds them on the host, jax.Array once on device.
HostOrDevice = Any


@jax.tree_util.register_dataclass
@dataclass
class StepInputs:
    token_ids: HostOrDevice  # i32[T]; padding: 0
    positions: HostOrDevice  # i32[T]; absolute position of each token; padding: 0
    slot_mapping: HostOrDevice  # i32[T]; page * B + offset; padding: -1
    page_table: HostOrDevice  # i32[S, W]; padding: 0 (the null page)
    kv_lens: HostOrDevice  # i32[S]; context length after this step; padding: 0
    cu_q_lens: HostOrDevice  # i32[S + 1]; query start offsets; padding sequences add 0
    logits_indices: HostOrDevice  # i32[S]; the token whose logits sample each sequence


KVCache = list[tuple[jax.Array, jax.Array]]  # per layer (k, v), each [K, P, B, H]


class AttentionFn(Protocol):
    def __call__(self, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                 page_table: jax.Array, kv_lens: jax.Array, cu_q_lens: jax.Array, *,
                 sm_scale: float, sliding_window: int | None = None,
                 soft_cap: float | None = None) -> jax.Array: ...


class WriteKVFn(Protocol):
    def __call__(self, k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array,
                 slot_mapping: jax.Array) -> tuple[jax.Array, jax.Array]: ...
