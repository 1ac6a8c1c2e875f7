"""StepInputs: the device-side inputs of one model step, one registered pytree.

Built (padded, on the host) by ``serving.engine.model_runner`` and consumed by every model family
and ``ops`` attention. Shapes are padded to the step's bucket: T tokens, S sequences, W page-table
width. The metadata contract is the one in ``ops.attention``'s module docstring.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import jax
import numpy as np

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


def pack_step_inputs(chunks: Sequence[tuple[Sequence[int], int, Sequence[int]]],
                     num_tokens: int, num_seqs: int, width: int, page_size: int) -> StepInputs:
    """Host-side ``StepInputs`` padded to T = ``num_tokens``, S = ``num_seqs``, W = ``width``.

    ``chunks[i] = (tokens, start, pages)``: sequence i computes ``tokens`` at positions
    ``start, start + 1, ...`` and owns ``pages`` (its whole page-table row). Tokens are packed back
    to back in chunk order; each sequence samples from its last token. Callers: the generation
    runner (``serving.engine.model_runner``) and the decoder pooling runner.
    """
    token_ids = np.zeros(num_tokens, np.int32)
    positions = np.zeros(num_tokens, np.int32)
    slots = np.full(num_tokens, -1, np.int32)
    page_table = np.zeros((num_seqs, width), np.int32)
    kv_lens = np.zeros(num_seqs, np.int32)
    cu = np.zeros(num_seqs + 1, np.int32)
    last = np.zeros(num_seqs, np.int32)
    off = 0
    for i, (tokens, start, pages) in enumerate(chunks):
        n = len(tokens)
        pos = np.arange(start, start + n, dtype=np.int32)
        row = np.asarray(pages, np.int32)
        token_ids[off:off + n] = tokens
        positions[off:off + n] = pos
        slots[off:off + n] = row[pos // page_size] * page_size + pos % page_size
        page_table[i, :len(row)] = row
        kv_lens[i] = start + n
        cu[i + 1] = cu[i] + n
        last[i] = off + n - 1
        off += n
    cu[len(chunks) + 1:] = cu[len(chunks)]
    return StepInputs(token_ids, positions, slots, page_table, kv_lens, cu, last)


KVCache = list[tuple[jax.Array, jax.Array]]  # per layer (k, v), each [K, P, B, H]


class AttentionFn(Protocol):
    def __call__(self, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                 page_table: jax.Array, kv_lens: jax.Array, cu_q_lens: jax.Array, *,
                 sm_scale: float, sliding_window: int | None = None,
                 soft_cap: float | None = None) -> jax.Array: ...


class WriteKVFn(Protocol):
    def __call__(self, k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array,
                 slot_mapping: jax.Array) -> tuple[jax.Array, jax.Array]: ...
