"""StepInputs: the inputs of one model step, one registered pytree.

Built (padded, on the host) by ``serving.engine.model_runner`` and consumed by every model family
and ``ops`` attention. Shapes are padded to the step's bucket: T tokens, S sequences, W page-table
width (0 for models that keep no KV cache). The metadata contract is the one in
``ops.attention``'s module docstring: tokens are packed back to back, grouped by sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, NamedTuple, Protocol, TypeVar

import jax
import numpy as np

# The array type of a step's inputs: numpy while the runner builds them on the host
# (``HostStepInputs``), jax.Array inside the compiled step (``StepInputs``, what models read).
A = TypeVar("A", jax.Array, np.ndarray)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Inputs(Generic[A]):
    token_ids: A  # i32[T]; padding: 0
    positions: A  # i32[T]; absolute position of each token in its sequence; padding: 0
    slot_mapping: A  # i32[T]; page * B + offset; -1: padding, or no KV cache
    page_table: A  # i32[S, W]; padding: 0 (the null page)
    kv_lens: A  # i32[S]; context length after this step; padding: 0
    cu_q_lens: A  # i32[S + 1]; query start offsets; padding sequences add 0
    logits_indices: A  # i32[S]; each sequence's last token this step (sampled / pooled)
    token_type_ids: A  # i32[T]; segment ids (BERT pairs); 0 for decoders and padding


StepInputs = Inputs[jax.Array]
HostStepInputs = Inputs[np.ndarray]


class PackedChunk(NamedTuple):
    """One sequence's share of a step, for ``pack_step_inputs``."""

    tokens: Sequence[int]  # computed this step, at positions start, start + 1, ...
    start: int
    pages: Sequence[int]  # the sequence's whole page-table row (empty: no KV cache)
    token_type_ids: Sequence[int] | None = None  # None: all 0


def pack_step_inputs(chunks: Sequence[PackedChunk], num_tokens: int, num_seqs: int,
                     width: int, page_size: int) -> HostStepInputs:
    """Host-side ``StepInputs`` padded to T = ``num_tokens``, S = ``num_seqs``, W = ``width``.

    Tokens are packed back to back in chunk order; each sequence samples (or pools its last
    token) from its last token. A model without a KV cache is packed with ``width`` 0 and empty
    page lists: every slot is -1 and no page table is read.
    """
    token_ids = np.zeros(num_tokens, np.int32)
    types = np.zeros(num_tokens, np.int32)
    positions = np.zeros(num_tokens, np.int32)
    slots = np.full(num_tokens, -1, np.int32)
    page_table = np.zeros((num_seqs, width), np.int32)
    kv_lens = np.zeros(num_seqs, np.int32)
    cu = np.zeros(num_seqs + 1, np.int32)
    last = np.zeros(num_seqs, np.int32)
    off = 0
    for i, c in enumerate(chunks):
        n = len(c.tokens)
        pos = np.arange(c.start, c.start + n, dtype=np.int32)
        token_ids[off:off + n] = c.tokens
        positions[off:off + n] = pos
        if c.token_type_ids is not None:
            types[off:off + n] = c.token_type_ids
        if width:
            row = np.asarray(c.pages, np.int32)
            slots[off:off + n] = row[pos // page_size] * page_size + pos % page_size
            page_table[i, :len(row)] = row
        kv_lens[i] = c.start + n
        cu[i + 1] = cu[i] + n
        last[i] = off + n - 1
        off += n
    cu[len(chunks) + 1:] = cu[len(chunks)]
    return Inputs(token_ids=token_ids, positions=positions, slot_mapping=slots,
                      page_table=page_table, kv_lens=kv_lens, cu_q_lens=cu,
                      logits_indices=last, token_type_ids=types)


KVCache = list[tuple[jax.Array, jax.Array]]  # per layer (k, v), each [K, P, B, H]; [] for encoders


class AttentionFn(Protocol):
    def __call__(self, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                 page_table: jax.Array, kv_lens: jax.Array, cu_q_lens: jax.Array, *,
                 sm_scale: float, sliding_window: int | None = None,
                 soft_cap: float | None = None) -> jax.Array: ...


class WriteKVFn(Protocol):
    def __call__(self, k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array,
                 slot_mapping: jax.Array) -> tuple[jax.Array, jax.Array]: ...


class EncoderAttentionFn(Protocol):
    """Bidirectional attention over this step's own tokens, per sequence (no KV pages):
    ``ops.attention.ragged_encoder_attention_reference``'s signature."""

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, cu_q_lens: jax.Array, *,
                 sm_scale: float) -> jax.Array: ...
