"""Requests and sequences: the value that enters the engine, and the engine's bookkeeping.

- ``EngineRequest``: frozen and validated (``serving.engine.input_processor`` builds it once, on
  the caller's thread). Either generation (``sampling``) or pooling (``pooling``): a pooling
  request is a prompt with no output tokens that finishes when its prompt is computed.
- ``Request`` / ``Sequence``: the engine thread's live state. A request fans out into ``n``
  sequences (one per choice) that the scheduler runs independently; only the scheduler mutates
  them. They never cross a stage boundary: the runner sees ``records.ScheduledRow`` copies.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from models.pooling import PoolingType
from serving.engine.pooling_params import PoolingKind, PoolingParams
from serving.engine.records import PooledChunk
from serving.engine.sampling_params import SamplingParams
from serving.engine.structured_output import CompiledGrammar, GrammarMatcher


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_ids: tuple[int, ...]  # after truncation; every id in the vocabulary
    arrival: float
    sampling: SamplingParams | None = None  # generation
    pooling: PoolingParams | None = None  # pooling (exactly one of the two is set)
    pooling_type: PoolingType | None = None  # the model's pooler, for PoolingKind.POOLED
    seed: int = 0  # u32: the caller's seed, or one drawn at admission
    max_tokens: int = 0  # output tokens allowed (resolved against max_model_len); 0: pooling
    eos_ids: frozenset[int] = frozenset()
    cache_salt: str = ""  # prefix-cache namespace ("" shares across requests)
    token_type_ids: tuple[int, ...] | None = None  # BERT segment ids, as long as the prompt
    # Every prompt position must be computed here (prompt logprobs, MEAN / CLS / per-token
    # pooling, encoders): the prefix cache may not skip any.
    full_prompt: bool = False
    # The compiled grammar of ``sampling.structured`` (compiled and validated before the request
    # reaches the engine); None: unconstrained.
    grammar: CompiledGrammar | None = None
    # With a grammar: it applies only once the output holds this text (the end of a reasoning
    # model's thinking, vLLM's rule); None: from the first output token.
    grammar_after: str | None = None

    @property
    def n(self) -> int:
        return self.sampling.n if self.sampling is not None else 1

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def pooling_kind(self) -> PoolingKind | None:
        return None if self.pooling is None else self.pooling.kind


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class PoolAccumulator:
    """A pooling prompt's result, gathered over its chunks (which may be several when the
    prompt is chunked)."""

    first: np.ndarray | None = None
    last: np.ndarray | None = None
    total: np.ndarray | None = None
    tokens: list[np.ndarray] = field(default_factory=list)
    scores: np.ndarray | None = None

    def add(self, chunk: PooledChunk) -> None:
        if self.first is None:
            self.first = chunk.first
        self.last = chunk.last
        self.total = chunk.total if self.total is None else self.total + chunk.total
        if chunk.tokens is not None:
            self.tokens.append(chunk.tokens)
        if chunk.scores is not None:
            self.scores = chunk.scores

    def result(self, req: EngineRequest) -> np.ndarray:
        """The raw pooled output of the whole prompt (post-processing is per request, later)."""
        kind = req.pooling_kind
        if kind == PoolingKind.TOKENS:
            return np.concatenate(self.tokens)
        if kind == PoolingKind.SCORES:
            assert self.scores is not None
            return self.scores
        assert self.first is not None and self.last is not None and self.total is not None
        if req.pooling_type == PoolingType.CLS:
            return self.first
        if req.pooling_type == PoolingType.LAST:
            return self.last
        return self.total / np.float32(req.prompt_len)


@dataclass(eq=False)
class Sequence:
    seq_id: int  # unique within the engine; how rows name it
    request: Request
    index: int  # choice index within the request
    tokens: list[int]  # prompt then output token ids
    num_computed: int = 0  # tokens whose K/V are in the cache (or computed, without one)
    pages: list[int] = field(default_factory=list)
    num_hashed_pages: int = 0  # leading full pages registered in the prefix cache
    last_hash: bytes = b""  # chained hash of page num_hashed_pages - 1
    num_cached_tokens: int = 0  # prompt tokens that came from the prefix cache
    status: SeqStatus = SeqStatus.WAITING
    pool: PoolAccumulator | None = None
    # The grammar state after the output tokens so far (kept through preemption: the tokens
    # are kept too); None: unconstrained.
    matcher: GrammarMatcher | None = None
    history_slot: int = -1  # its penalty-history row while running (penalties only)

    @property
    def spec(self) -> EngineRequest:
        return self.request.spec

    @property
    def prompt_len(self) -> int:
        return self.request.spec.prompt_len

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def ready(self) -> bool:
        """Siblings wait until choice 0 has its prompt in the cache, then share its pages."""
        first = self.request.seqs[0]
        return (self.index == 0 or first.status == SeqStatus.FINISHED
                or first.num_computed >= self.prompt_len)


@dataclass(eq=False)
class Request:
    spec: EngineRequest
    seqs: list[Sequence] = field(default_factory=list)

    @property
    def request_id(self) -> str:
        return self.spec.request_id

    @property
    def finished(self) -> bool:
        return all(s.status == SeqStatus.FINISHED for s in self.seqs)
