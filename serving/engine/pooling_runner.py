"""Bucketed, precompiled encoder steps for pooling models.

Called by ``serving.engine.pooling_engine`` (its background thread) with one batch of token
sequences at a time; returns one numpy array per sequence. Every step runs an executable compiled
ahead of time for a fixed shape ``(S, T)``: S from ``seq_buckets`` (batch size, padded with empty
rows), T from ``token_buckets`` (tokens per row, right-padded). ``warmup()`` compiles every
allowed shape for every output kind the model serves, so serving never compiles;
``num_compiles`` counts compilations and stays constant after warmup (tests check it).

Allowed shapes: ``S * T <= max_num_batched_tokens`` (the activation-memory budget; the attention
scores alone are ``S * N * T * T`` floats), except that S = 1 is always allowed so any input up
to ``max_model_len`` runs.

Output kinds (one compiled family each):
- ``pooled``: ``f32[S, D]`` from the model's pooler (MEAN/CLS/LAST), not normalised: the
  engine normalises per request, because requests may turn it off;
- ``hidden``: ``f32[S, T, D]`` per-token hidden states (ALL pooling), sliced per row on host;
- ``logits``: ``f32[S, L]`` raw classifier logits; activations are applied per request.

``BucketedRunner`` holds what the engine relies on for any model: the ``(S, T)`` batch grid it
forms batches on, compile bookkeeping and ``warmup``. ``PoolingRunner`` (here) runs encoders on
exactly that grid; ``serving.engine.pooling_decoder.DecoderPoolingRunner`` runs decoder models
as packed causal prefills and compiles per packed-token bucket instead.

Axis letters: S sequences, T tokens, D hidden dim, L labels.
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.bert import BertForSequenceClassification, BertModel
from models.pooling import PoolingType, pool

logger = logging.getLogger(__name__)

KINDS = ("pooled", "hidden", "logits")

# Shortest token bucket; shorter inputs are padded to it.
MIN_TOKEN_BUCKET = 16
# Per-token outputs are S * T * D floats to bring back: their steps stay small.
HIDDEN_MAX_SEQS = 8


def default_token_buckets(max_model_len: int) -> list[int]:
    """Powers of two from 16 below ``max_model_len``, then ``max_model_len`` itself."""
    buckets: list[int] = []
    t = MIN_TOKEN_BUCKET
    while t < max_model_len:
        buckets.append(t)
        t *= 2
    buckets.append(max_model_len)
    return buckets


def default_seq_buckets(max_num_seqs: int) -> list[int]:
    """Powers of two below ``max_num_seqs``, then ``max_num_seqs`` itself."""
    buckets: list[int] = []
    s = 1
    while s < max_num_seqs:
        buckets.append(s)
        s *= 2
    buckets.append(max_num_seqs)
    return buckets


class BucketedRunner(abc.ABC):
    """What ``PoolingEngine`` needs from a runner, shared by the encoder and decoder runners.

    The engine forms batches on the ``(S, T)`` grid below (``token_bucket``, ``max_batch``,
    ``seq_bucket``); a subclass decides which shapes it compiles (``shapes``, ``_compile``) and
    runs a batch (``_run``). ``_executable`` counts compilations; ``warmup`` compiles every shape
    of every kind, so ``num_recompiles`` stays 0 while serving.
    """

    is_classifier = False
    kinds: tuple[str, ...] = ("pooled", "hidden")

    def __init__(
        self,
        *,
        max_model_len: int,
        max_num_seqs: int,
        max_num_batched_tokens: int | None,
        token_buckets: Sequence[int] | None,
        seq_buckets: Sequence[int] | None,
        hidden_max_seqs: int,
    ):
        self.max_model_len = max_model_len
        self.token_buckets = sorted(set(token_buckets or default_token_buckets(max_model_len)))
        if self.token_buckets[-1] < max_model_len:
            raise ValueError(f"the largest token bucket {self.token_buckets[-1]} is below "
                             f"max_model_len {max_model_len}")
        self.seq_buckets = sorted(set(seq_buckets or default_seq_buckets(max_num_seqs)))
        self.max_num_batched_tokens = max_num_batched_tokens or max(8192, max_model_len)
        self.hidden_max_seqs = max(hidden_max_seqs, 1)
        self._compiled: dict[tuple[str, tuple[int, int]], Any] = {}
        self._compile_lock = threading.Lock()
        self.num_compiles = 0  # every compilation, warmup included
        self.num_recompiles = 0  # compilations after warmup: a missed bucket while serving
        self.warmed_up = False
        self.compile_seconds = 0.0

    # ------------------------------------------------------------------------- batch shapes

    def token_bucket(self, num_tokens: int) -> int:
        """Smallest T bucket holding ``num_tokens``; ValueError past ``max_model_len``."""
        if num_tokens > self.max_model_len:
            raise ValueError(f"{num_tokens} tokens exceed max_model_len {self.max_model_len}")
        for t in self.token_buckets:
            if t >= num_tokens:
                return t
        raise AssertionError("unreachable: the last bucket is >= max_model_len")

    def max_batch(self, t_bucket: int, kind: str = "pooled") -> int:
        """Largest S bucket allowed with T = ``t_bucket`` for ``kind`` (at least 1)."""
        limit = self.hidden_max_seqs if kind == "hidden" else max(self.seq_buckets)
        allowed = [s for s in self.seq_buckets
                   if s * t_bucket <= self.max_num_batched_tokens and s <= limit]
        return max(allowed) if allowed else 1

    def seq_bucket(self, num_seqs: int, t_bucket: int, kind: str = "pooled") -> int:
        """Smallest S bucket holding ``num_seqs`` rows at T = ``t_bucket``."""
        cap = self.max_batch(t_bucket, kind)
        for s in self.seq_buckets:
            if num_seqs <= s <= cap:
                return s
        if num_seqs == 1:
            return 1
        raise ValueError(f"{num_seqs} sequences do not fit one step at {t_bucket} tokens "
                         f"(at most {cap})")

    def batch_shapes(self, kind: str = "pooled") -> list[tuple[int, int]]:
        """Every (S, T) batch the engine may form for ``kind``."""
        out: list[tuple[int, int]] = []
        for t in self.token_buckets:
            cap = self.max_batch(t, kind)
            out.extend((s, t) for s in self.seq_buckets if s <= cap)
            if cap == 1 and 1 not in self.seq_buckets:
                out.append((1, t))
        return out

    # ------------------------------------------------------------------------- compile

    @abc.abstractmethod
    def shapes(self, kind: str = "pooled") -> list[tuple[int, int]]:
        """Every shape compiled for ``kind``; ``warmup`` compiles them all."""

    @abc.abstractmethod
    def _compile(self, kind: str, shape: tuple[int, int]) -> Any:
        """Lower and compile the step of ``kind`` for ``shape``."""

    def _executable(self, kind: str, shape: tuple[int, int]) -> Any:
        key = (kind, shape)
        exe = self._compiled.get(key)
        if exe is not None:
            return exe
        with self._compile_lock:
            exe = self._compiled.get(key)
            if exe is None:
                start = time.perf_counter()
                exe = self._compile(kind, shape)
                self.compile_seconds += time.perf_counter() - start
                self.num_compiles += 1
                if self.warmed_up:
                    self.num_recompiles += 1
                    logger.warning("pooling runner compiled %s after warmup", key)
                self._compiled[key] = exe
        return exe

    def warmup(self) -> None:
        """Compile every (kind, shape) this model serves. Idempotent."""
        if self.warmed_up:
            return
        start = time.perf_counter()
        for kind in self.kinds:
            for shape in self.shapes(kind):
                self._executable(kind, shape)
        self.warmed_up = True
        logger.info("pooling runner: %d executables (%s) ready in %.1fs", len(self._compiled),
                    "/".join(self.kinds), time.perf_counter() - start)

    # ------------------------------------------------------------------------- run

    @abc.abstractmethod
    def step_shape(self, kind: str, lengths: Sequence[int]) -> tuple[tuple[int, int], int]:
        """The compiled shape a batch of sequences of ``lengths`` runs with, and how many token
        slots (real and padding) that step computes."""

    def run(
        self,
        kind: str,
        token_ids: Sequence[Sequence[int]],
        token_type_ids: Sequence[Sequence[int] | None] | None = None,
    ) -> list[np.ndarray]:
        """Run one step on ``len(token_ids)`` sequences (1 <= n <= the bucket's capacity).

        Returns per sequence: ``pooled`` f32[D], ``hidden`` f32[n_tokens, D], ``logits``
        f32[L]. Every sequence must be non-empty and at most ``max_model_len`` long, ids in
        vocab; the engine validates requests before they get here.
        """
        if kind not in self.kinds:
            raise ValueError(f"this model does not produce {kind!r} outputs")
        if not token_ids:
            return []
        return self._run(kind, token_ids, token_type_ids)

    @abc.abstractmethod
    def _run(self, kind: str, token_ids: Sequence[Sequence[int]],
             token_type_ids: Sequence[Sequence[int] | None] | None) -> list[np.ndarray]:
        """``run`` for a valid kind and at least one sequence."""


class PoolingRunner(BucketedRunner):
    """Encoders: the model's weights on device and one compiled executable per (kind, S, T)."""

    def __init__(
        self,
        model: BertModel | BertForSequenceClassification,
        pooling_type: PoolingType,
        *,
        max_model_len: int,
        max_num_seqs: int = 32,
        max_num_batched_tokens: int | None = None,
        token_buckets: Sequence[int] | None = None,
        seq_buckets: Sequence[int] | None = None,
        hidden_max_seqs: int = HIDDEN_MAX_SEQS,
    ):
        if pooling_type == PoolingType.ALL:
            raise ValueError("the model's pooler must reduce to one vector (MEAN/CLS/LAST); "
                             "per-token output is the 'hidden' kind")
        cfg = model.cfg
        if max_model_len > cfg.max_input_len:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's "
                             f"{cfg.max_input_len} positions")
        super().__init__(max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                         max_num_batched_tokens=max_num_batched_tokens,
                         token_buckets=token_buckets, seq_buckets=seq_buckets,
                         hidden_max_seqs=hidden_max_seqs)
        self.is_classifier = isinstance(model, BertForSequenceClassification)
        self.kinds = ("logits",) if self.is_classifier else ("pooled", "hidden")
        self.pooling_type = pooling_type
        self.vocab_size = cfg.vocab_size
        self.type_vocab_size = max(cfg.type_vocab_size, 1)
        self.pad_token_id = cfg.pad_token_id
        self.hidden_size = cfg.hidden_size
        self.num_labels = cfg.num_labels
        self._graphdef, self._state = nnx.split(model)

    def shapes(self, kind: str = "pooled") -> list[tuple[int, int]]:
        """Every (S, T) the runner may execute for ``kind``: the engine's batch grid."""
        return self.batch_shapes(kind)

    def _step_fn(self, kind: str) -> Any:
        graphdef, pooling_type = self._graphdef, self.pooling_type

        def step(state: nnx.State, ids: jax.Array, types: jax.Array,
                 lengths: jax.Array) -> jax.Array:
            model = nnx.merge(graphdef, state)
            if kind == "logits":
                return model(ids, types, lengths)  # [S, L]
            hidden = model(ids, types, lengths)  # [S, T, D]
            if kind == "pooled":
                return pool(hidden, lengths, pooling_type)  # [S, D]
            return pool(hidden, lengths, PoolingType.ALL)  # [S, T, D], padding zeroed

        return step

    def _compile(self, kind: str, shape: tuple[int, int]) -> Any:
        s, t = shape
        ids = jax.ShapeDtypeStruct((s, t), jnp.int32)
        lengths = jax.ShapeDtypeStruct((s,), jnp.int32)
        return jax.jit(self._step_fn(kind)).lower(self._state, ids, ids, lengths).compile()

    def step_shape(self, kind: str, lengths: Sequence[int]) -> tuple[tuple[int, int], int]:
        t = self.token_bucket(max(lengths))
        s = self.seq_bucket(len(lengths), t, kind)
        return (s, t), s * t

    def _run(self, kind: str, token_ids: Sequence[Sequence[int]],
             token_type_ids: Sequence[Sequence[int] | None] | None) -> list[np.ndarray]:
        n = len(token_ids)
        lens = [len(x) for x in token_ids]
        (s, t), _ = self.step_shape(kind, lens)
        ids = np.full((s, t), self.pad_token_id, dtype=np.int32)
        types = np.zeros((s, t), dtype=np.int32)
        lengths = np.zeros((s,), dtype=np.int32)
        for i, seq in enumerate(token_ids):
            ids[i, : lens[i]] = seq
            lengths[i] = lens[i]
            tt = token_type_ids[i] if token_type_ids is not None else None
            if tt is not None:
                types[i, : lens[i]] = tt
        out = np.asarray(self._executable(kind, (s, t))(self._state, ids, types, lengths))
        if kind == "hidden":
            return [out[i, : lens[i]] for i in range(n)]
        return [out[i] for i in range(n)]
