"""Outputs the engine streams back to its callers (the HTTP layer and the offline API).

One ``RequestOutput`` is yielded per engine step in which a request made progress. Each carries
*deltas* for the choices that advanced: the new token ids, the new text, and the logprobs of the new
tokens. ``finish_reason`` is set exactly once per choice, on its last delta.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
