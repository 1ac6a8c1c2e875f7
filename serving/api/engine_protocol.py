"""The engine interface the HTTP layer is written against (``serving.engine.engine_client``).

A structural ``Protocol``, so that ``serving.api`` type-checks against the contract rather than
one implementation. ``AsyncEngineClient`` in ``serving/engine/engine_client.py`` satisfies it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from serving.engine.outputs import RequestOutput
from serving.engine.sampling_params import SamplingParams


class EngineStatsLike(Protocol):
    num_running: int
    num_waiting: int
    kv_pages_used: int
    kv_pages_total: int
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_steps: int
    num_recompiles: int
    prompt_tokens_total: int
    generation_tokens_total: int


class EngineClient(Protocol):
    """What the server needs from the engine.

    - ``generate`` yields deltas for one request; closing the iterator early aborts the request and
      frees its KV pages (the server relies on this for client disconnects).
    - ``is_healthy`` turns False when the engine loop died; in-flight requests then end with
      finish_reason "error".
    """

    model_name: str
    max_model_len: int
    vocab_size: int
    tokenizer: Any  # transformers.PreTrainedTokenizerFast
    generation_defaults: dict[str, Any]

    async def start(self) -> None: ...

    def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                 request_id: str) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    def is_healthy(self) -> bool: ...

    def stats(self) -> EngineStatsLike: ...

    async def shutdown(self, drain_timeout: float) -> None: ...
