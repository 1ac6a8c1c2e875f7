"""Admission control: how much work the server takes on, decided before any of it is done.

Every request that makes the engine work (completions, chat, embeddings and the other pooling
routes) passes ``admitted`` (``serving.api.routes.common``) first, before its body is parsed,
its chat template rendered or its prompt tokenized. It reserves one request slot and an
estimate of its prompt tokens (the body's size in bytes: a byte-level tokenizer never makes
more tokens than bytes, so the estimate is high, never low), and holds them until the response
is finished, aborted or failed. A route replaces the estimate with the real count once it has
tokenized (``Ticket.settle``).

Past either limit the request is refused with **503** (``type: "server_overloaded"``) and a
``Retry-After`` header; a refusal costs a dictionary lookup, so a burst far above capacity
cannot make the server do the work it is refusing. Limits (``--max-queued-requests``,
``--max-queued-prompt-tokens``):

- requests: ``--max-num-seqs`` (what the engine runs at once) plus ``--max-queued-requests``
  (default: 4 x ``--max-num-seqs``) may be admitted at a time;
- prompt tokens: the admitted requests' prompt tokens (estimated until tokenized) stay within
  ``--max-queued-prompt-tokens`` (default: no limit). A single request larger than the whole
  budget is still admitted when nothing else is, so that it gets its 400 or its answer.

The slot is also what the SIGTERM drain waits for (``ServerState.in_flight``).
"""

from __future__ import annotations

from dataclasses import dataclass

from serving.api.errors import APIError

RETRY_AFTER_S = 1
QUEUED_PER_RUNNING_SLOT = 4  # the default --max-queued-requests, per --max-num-seqs


class Overloaded(APIError):
    """503 ``server_overloaded``; ``reason`` ("requests" or "prompt_tokens") names the limit."""

    status = 503
    error_type = "server_overloaded"

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.headers = {"Retry-After": str(RETRY_AFTER_S)}


@dataclass(frozen=True)
class AdmissionLimits:
    max_requests: int  # running + queued
    max_prompt_tokens: int | None  # None: no limit

    @classmethod
    def for_engine(cls, max_num_seqs: int, max_queued_requests: int | None,
                   max_queued_prompt_tokens: int | None) -> AdmissionLimits:
        queued = (QUEUED_PER_RUNNING_SLOT * max_num_seqs if max_queued_requests is None
                  else max_queued_requests)
        return cls(max_num_seqs + queued, max_queued_prompt_tokens)


class Ticket:
    """One admitted request's reservation; ``settle`` once tokenized, ``release`` once done."""

    def __init__(self, admission: Admission, tokens: int) -> None:
        self._admission = admission
        self.tokens = tokens
        self._released = False

    def settle(self, tokens: int) -> None:
        """Replace the estimate with the prompt's real token count."""
        if not self._released:
            self._admission.prompt_tokens += tokens - self.tokens
            self.tokens = tokens

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission.requests -= 1
            self._admission.prompt_tokens -= self.tokens


class Admission:
    """The counts of admitted work, on the event loop (no lock: one thread touches them)."""

    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self.requests = 0
        self.prompt_tokens = 0

    def admit(self, estimated_tokens: int) -> Ticket:
        """A reservation, or ``Overloaded``."""
        if self.requests >= self.limits.max_requests:
            raise Overloaded(f"The server is overloaded: {self.requests} requests are already "
                             f"admitted (the limit is {self.limits.max_requests}); retry later.",
                             "requests")
        cap = self.limits.max_prompt_tokens
        if cap is not None and self.requests and self.prompt_tokens + estimated_tokens > cap:
            raise Overloaded(f"The server is overloaded: admitted prompts hold about "
                             f"{self.prompt_tokens} tokens (the limit is {cap}); retry later.",
                             "prompt_tokens")
        self.requests += 1
        self.prompt_tokens += estimated_tokens
        return Ticket(self, estimated_tokens)
