"""Request and Sequence: the engine's host-side bookkeeping for one request and its n samples.

A ``Request`` (what a caller submitted) fans out into ``n`` ``Sequence``s that the scheduler runs
independently. Sequences live only on the host: the runner reads them to build device arrays, and
only the engine mutates them (after each step).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from serving.engine.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request: Request
    index: int  # choice index within the request
    tokens: list[int]  # prompt then output token ids
    num_computed: int = 0  # tokens whose K/V are in the cache
    pages: list[int] = field(default_factory=list)
    num_hashed_pages: int = 0  # leading full pages registered in the prefix cache
    last_hash: bytes = b""  # chained hash of page num_hashed_pages - 1
    num_cached_tokens: int = 0  # prompt tokens that came from the prefix cache
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    detok: Any = None  # serving.engine.detokenizer.IncrementalDetokenizer
    pending_logprobs: list[Any] = field(default_factory=list)

    @property
    def seq_id(self) -> str:
        return f"{self.request.request_id}#{self.index}"

    @property
    def prompt_len(self) -> int:
        return self.request.prompt_len

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.request.prompt_len

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.request.prompt_len:]

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def ready(self) -> bool:
        """Siblings wait until choice 0 has its prompt in the cache, then share its pages."""
        first = self.request.seqs[0]
        return (self.index == 0 or first.status == SeqStatus.FINISHED
                or first.num_computed >= self.prompt_len)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int  # resolved: the caller's seed or a random one drawn at admission
    arrival: float
    eos_ids: frozenset[int]
    max_tokens: int  # resolved against max_model_len
    seqs: list[Sequence] = field(default_factory=list)
    prompt_logprobs_sent: bool = False
    prompt_logprobs: list[Any] | None = None  # filled by the runner as the prompt is computed
    cache_salt: str = ""  # prefix-cache namespace ("" shares across requests)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return all(s.status == SeqStatus.FINISHED for s in self.seqs)
