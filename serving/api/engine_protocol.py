"""The engine interface the HTTP layer is written against (``serving.engine.engine_client``).

A structural ``Protocol``, so that ``serving.api`` type-checks against the contract rather than
one implementation. ``AsyncEngineClient`` in ``serving/engine/engine_client.py`` (and the
data-parallel client over several of them) satisfies ``EngineClient`` for a generation model and
``PoolingEngineClient`` for a pooling one: it is one engine either way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from serving.engine.outputs import RequestOutput
from serving.engine.pooling_params import (
    PoolingInput,
    PoolingModelInfo,
    PoolingOutput,
    PoolingParams,
)
from serving.engine.request import EngineRequest
from serving.engine.sampling_params import SamplingParams
from serving.engine.structured_output import CompiledGrammar, GrammarBackend


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
    kv_pages_cached: int
    num_aborted: int
    num_failed_steps: int
    kv_leaks_detected: int


class ServingEngine(Protocol):
    """What the server needs from any engine: lifecycle, health, stats, the tokenizer.

    - ``is_healthy`` turns False when the engine loop died; in-flight requests then end with
      an error.
    - An engine may declare ``supported_tasks`` (``"generate"``, or pooling tasks such as
      ``"embed"``, ``"encode"``, ``"classify"``, ``"score"``); one that does not is a
      generation engine (``ServerState.tasks``).
    """

    model_name: str
    max_model_len: int
    vocab_size: int
    tokenizer: Any  # transformers.PreTrainedTokenizerFast
    generation_defaults: dict[str, Any]
    max_num_seqs: int  # sequences it runs at once (admission control sizes its queue from it)

    async def start(self) -> None: ...

    def is_healthy(self) -> bool: ...

    def stats(self) -> EngineStatsLike: ...

    async def shutdown(self, drain_timeout: float) -> None: ...


class EngineClient(ServingEngine, Protocol):
    """A generation engine. ``make_request`` validates a request, once (a ``ValueError`` whose
    ``param`` names the field, ``serving.engine.input_processor.RequestError``); ``generate``
    yields deltas for it; closing the iterator early aborts the request and frees its KV pages
    (the server relies on this for client disconnects). ``cache_salt`` namespaces the request's
    prefix-cache pages: requests with different salts (None is the shared namespace) never
    reuse each other's cached K/V. ``grammars`` compiles structured-output specs (thread-safe,
    seconds at worst: off the event loop); None when the engine cannot constrain its output.
    A request with ``params.structured`` passes its compiled ``grammar`` to ``make_request``."""

    grammars: GrammarBackend | None

    def make_request(self, request_id: str, prompt_token_ids: list[int],
                     params: SamplingParams, *, cache_salt: str | None = None,
                     grammar: CompiledGrammar | None = None) -> EngineRequest: ...

    def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, request_id: str) -> None: ...


class PoolingEngineClient(ServingEngine, Protocol):
    """An engine serving a pooling model: embeddings, per-token states, classifier and
    cross-encoder scores."""

    info: PoolingModelInfo

    @property
    def supported_tasks(self) -> tuple[str, ...]: ...

    @property
    def labels(self) -> list[str]: ...

    async def encode(self, inputs: list[PoolingInput],
                     params: PoolingParams) -> list[PoolingOutput]: ...

    def tokenize(self, texts: list[str], *, add_special_tokens: bool = True,
                 truncate_prompt_tokens: int | None = None) -> list[PoolingInput]: ...

    def tokenize_pairs(self, texts_1: list[str], texts_2: list[str], *,
                       truncate_prompt_tokens: int | None = None) -> list[PoolingInput]: ...
