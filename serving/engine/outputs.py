"""What the engine hands back: per-sequence records from the engine thread, and the request
outputs its callers (the HTTP layer, the offline API) consume.

- ``SeqOutput``: one per sequence that made progress in a step, built by
  ``Scheduler.update_from_output`` on the engine thread: new token ids (no text), their logprobs,
  prompt logprobs computed this step, the finish, or a pooling request's raw result.
- ``RequestOutput``: built from those by ``serving.engine.output_processor`` off the engine thread.
  One per engine step in which a request made progress, carrying *deltas* for the choices that
  advanced: the new token ids, the new text, and the logprobs of the new tokens.
  ``finish_reason`` is set exactly once per choice, on its last delta.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from serving.engine.records import PositionLogprob, SampledToken


@dataclass(frozen=True)
class SeqOutput:
    request_id: str
    index: int  # choice index in [0, n)
    new_token_ids: tuple[int, ...] = ()
    logprobs: tuple[SampledToken, ...] = ()  # one per new token when the request wants them
    prompt_logprobs: tuple[PositionLogprob, ...] = ()  # prompt positions computed this step
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | None = None  # the stop token id that matched
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    pooled: np.ndarray | None = None  # a pooling request's raw result, on its finish


@dataclass
class TokenLogprob:
    """The logprob of one token position: the chosen/actual token and its top alternatives."""

    token_id: int
    logprob: float
    rank: int  # 1-based rank of token_id in the distribution
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first


@dataclass
class CompletionDelta:
    index: int  # choice index in [0, n)
    token_ids: list[int]  # new tokens since the previous delta of this choice
    text: str  # new text since the previous delta (stop strings already cut)
    logprobs: list[TokenLogprob] | None = None  # one per new token, when requested
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"; set once
    stop_reason: int | str | None = None  # the stop token id or stop string that matched
    num_generated: int = 0  # cumulative output tokens of this choice


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionDelta]
    finished: bool = False  # every choice finished
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on the first output only
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None  # set when the engine failed the request (finish_reason "error")
