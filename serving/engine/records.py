"""The frozen records that cross the scheduler -> runner -> scheduler boundary, once per step.

``Scheduler.schedule()`` returns a ``SchedulerOutput``; ``ModelRunner.execute`` reads only that
and returns a ``RunnerOutput`` whose ``rows`` line up one to one with the scheduled rows;
``Scheduler.update_from_output`` zips the two. Nothing here references a live ``Sequence``: rows
name their sequence by ``seq_id`` (an int the scheduler assigned) and carry copies of what the
runner needs (token ids, page ids, the frozen ``SamplingParams``). Pure Python and numpy; no JAX.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from serving.engine.pooling_params import PoolingKind
from serving.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class SamplingRow:
    """What the sampler needs for one sequence whose chunk ends at its last known token."""

    params: SamplingParams
    seed: int  # u32: the request's seed mixed with the choice index
    num_output: int  # output tokens so far: the PRNG counter of the token drawn now
    prompt_len: int
    banned: tuple[int, ...]  # eos / stop ids banned while below min_tokens (-inf bias)
    # A grammar constrains the token drawn now: the scheduler fills this row's mask (the row
    # itself carries no grammar state; the matcher stays with the sequence).
    constrained: bool = False


@dataclass(frozen=True)
class PromptLogprobRow:
    """Prompt logprobs wanted for this chunk: ``next_ids[j]`` is the prompt token that follows
    position ``start + j`` (-1 past the prompt's end)."""

    num_top: int
    next_ids: tuple[int, ...]


@dataclass(frozen=True)
class ScheduledRow:
    """One sequence's share of a step."""

    seq_id: int
    token_ids: tuple[int, ...]  # computed this step, at positions start, start + 1, ...
    start: int
    pages: tuple[int, ...]  # the sequence's whole page-table row (empty: no KV cache)
    sampling: SamplingRow | None = None  # None: no token is drawn after this chunk
    prompt_logprobs: PromptLogprobRow | None = None
    pooling: PoolingKind | None = None  # set on every prompt chunk of a pooling request
    token_type_ids: tuple[int, ...] | None = None  # BERT segment ids of this chunk
    # Penalties: the sequence's row of the runner's device-resident token history
    # (``ModelRunner`` "Penalty history"); -1: the sequence uses no penalties.
    history_slot: int = -1
    # The tokens [0, start) the history row does not hold yet: set on the first row after the
    # sequence took its slot when that row starts past 0 (prefix-cache hit); None otherwise.
    history_prefix: tuple[int, ...] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    rows: tuple[ScheduledRow, ...] = ()
    preempted: tuple[int, ...] = ()  # seq ids sent back to the queue this step

    @property
    def num_tokens(self) -> int:
        return sum(r.num_tokens for r in self.rows)

    @property
    def empty(self) -> bool:
        return not self.rows


@dataclass(frozen=True)
class SampledToken:
    """A drawn token with its raw-model logprob, rank and top alternatives (empty unless asked)."""

    token_id: int
    logprob: float = 0.0
    rank: int = 0
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


@dataclass(frozen=True)
class PositionLogprob:
    """The logprob of the prompt token at ``position`` given the tokens before it."""

    position: int
    token_id: int
    logprob: float
    rank: int
    top_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]


@dataclass(frozen=True)
class PooledChunk:
    """What one chunk of a pooling request's prompt contributes (f32 arrays, read-only).

    ``first`` / ``last``: hidden states of the chunk's first and last token; ``total``: their
    sum over the chunk (MEAN pooling divides the sum over all chunks); ``tokens``: every token's
    state ``[n, D]`` (``PoolingKind.TOKENS`` only); ``scores``: the classifier head's logits on
    ``first`` (``PoolingKind.SCORES`` only, whose prompts are never chunked).
    """

    first: np.ndarray
    last: np.ndarray
    total: np.ndarray
    tokens: np.ndarray | None = None
    scores: np.ndarray | None = None


@dataclass(frozen=True)
class RowResult:
    sampled: SampledToken | None = None
    prompt_logprobs: tuple[PositionLogprob, ...] = ()
    pooled: PooledChunk | None = None


@dataclass(frozen=True)
class RunnerOutput:
    rows: tuple[RowResult, ...] = ()  # rows[i] belongs to SchedulerOutput.rows[i]
