"""DataParallelClient: N independent engine replicas behind the ``AsyncEngineClient`` API.

Data parallelism here is replicas, not batch sharding: replica i is a complete engine (its own
scheduler, KV page pool and engine thread) on mesh row i, i.e. devices ``[i * tp, (i + 1) * tp)``
of a ``(data, model)`` mesh. Each request goes whole to one replica, the one with the fewest
requests in flight (ties: round robin). Why not one engine with the batch sharded over ``data``:
every step would be padded to the busiest replica's shape and wait for the slowest one, the page
allocator would need per-replica pools in lockstep, and a prefix-cache hit on one replica could not
serve another anyway. Replicas share nothing, so they need no synchronisation at all. See
docs/SHARDING.md.

The HTTP layer can use this class wherever it uses ``AsyncEngineClient``: same attributes
(``model_name``, ``max_model_len``, ``vocab_size``, ``tokenizer``, ``generation_defaults``,
``supported_tasks``, ``info``, ``labels``, ``engine``, ``error``), same methods (``make_request``,
``start``, ``generate``, ``encode``, ``abort``, ``shutdown``), same ``is_healthy`` / ``stats`` /
``num_in_flight`` / ``tokenize`` / ``tokenize_pairs``. ``stats()`` sums the replicas.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
from collections.abc import AsyncIterator
from typing import Any

import jax

from models.registry import LoadedModel
from serving.engine.config import EngineArgs
from serving.engine.engine import EngineStats, LLMEngine
from serving.engine.engine_client import AsyncEngineClient
from serving.engine.outputs import RequestOutput
from serving.engine.pooling_params import PoolingInput, PoolingOutput, PoolingParams
from serving.engine.request import EngineRequest
from serving.engine.sampling_params import SamplingParams
from serving.engine.sharded import shard_loaded
from serving.engine.structured_output import CompiledGrammar, GrammarBackend
from sharding.mesh import MeshError, make_mesh, replica_meshes, resolve_shape
from sharding.sharder import Sharder

log = logging.getLogger("xlaserve.dp")


class DataParallelClient:
    def __init__(self, replicas: list[AsyncEngineClient]) -> None:
        if not replicas:
            raise ValueError("DataParallelClient needs at least one replica")
        self.replicas = replicas
        first = replicas[0]
        self.model_name: str = first.model_name
        self.max_model_len: int = first.max_model_len
        self.max_num_seqs: int = sum(r.max_num_seqs for r in replicas)
        self.vocab_size: int = first.vocab_size
        self.tokenizer: Any = first.tokenizer
        self.generation_defaults: dict[str, Any] = first.generation_defaults
        self.supported_tasks: tuple[str, ...] = first.supported_tasks
        # A grammar compiled by one replica's backend holds for all: same tokenizer, same width.
        self.grammars: GrammarBackend | None = first.grammars
        self._owner: dict[str, AsyncEngineClient] = {}
        self._rr = itertools.count()

    @classmethod
    def from_args(cls, args: EngineArgs, loaded: LoadedModel | None = None,
                  warmup: bool = True) -> DataParallelClient:
        """One engine per row of the ``(data_parallel_size, tensor_parallel_size)`` mesh.

        The model is loaded once, onto replica 0's mesh (straight into its sharding); the other
        replicas copy their weights from it. ``loaded`` (tests) skips the load.
        """
        shape = resolve_shape(args.tensor_parallel_size, args.data_parallel_size, args.mesh)
        if shape.data > 1 and jax.process_count() > 1:
            raise MeshError("data-parallel replicas across hosts are not supported: run one "
                            "`serve` per host (or tensor parallelism across hosts)")
        per_replica = dataclasses.replace(args, data_parallel_size=1, mesh=None,
                                          tensor_parallel_size=shape.model)
        engines: list[LLMEngine] = []
        for i, mesh in enumerate(replica_meshes(make_mesh(shape))):
            sharder = Sharder(mesh)
            source = loaded if not engines else engines[0].loaded
            if source is not None:
                source = shard_loaded(source, sharder)
            engines.append(LLMEngine(per_replica, loaded=source, sharder=sharder,
                                     warmup=warmup))
            log.info("data-parallel replica %d: %s", i, sharder.describe())
        return cls([AsyncEngineClient(e) for e in engines])

    # ---- the AsyncEngineClient API -------------------------------------------------------------
    @property
    def engine(self) -> LLMEngine:
        """Replica 0's engine (request validation and model facts are the same on every one)."""
        return self.replicas[0].engine

    @property
    def error(self) -> str | None:
        return next((r.error for r in self.replicas if r.error), None)

    async def start(self) -> None:
        for r in self.replicas:
            await r.start()

    def is_healthy(self) -> bool:
        return all(r.is_healthy() for r in self.replicas)

    def stats(self) -> EngineStats:
        each = [r.stats() for r in self.replicas]
        return EngineStats(**{f.name: sum(getattr(st, f.name) for st in each)
                              for f in dataclasses.fields(EngineStats)})

    @property
    def info(self) -> Any:
        return self.replicas[0].info

    @property
    def labels(self) -> list[str]:
        return self.replicas[0].labels

    def tokenize(self, texts: list[str], *, add_special_tokens: bool = True,
                 truncate_prompt_tokens: int | None = None) -> list[PoolingInput]:
        return self.replicas[0].tokenize(texts, add_special_tokens=add_special_tokens,
                                         truncate_prompt_tokens=truncate_prompt_tokens)

    def tokenize_pairs(self, texts_1: list[str], texts_2: list[str], *,
                       truncate_prompt_tokens: int | None = None) -> list[PoolingInput]:
        return self.replicas[0].tokenize_pairs(texts_1, texts_2,
                                               truncate_prompt_tokens=truncate_prompt_tokens)

    @property
    def num_in_flight(self) -> int:
        return sum(r.num_in_flight for r in self.replicas)

    def _pick(self) -> AsyncEngineClient:
        healthy = [r for r in self.replicas if r.is_healthy()] or self.replicas
        least = min(r.num_in_flight for r in healthy)
        ties = [r for r in healthy if r.num_in_flight == least]
        return ties[next(self._rr) % len(ties)]

    def make_request(self, request_id: str, prompt_token_ids: list[int],
                     params: SamplingParams, *, cache_salt: str | None = None,
                     grammar: CompiledGrammar | None = None) -> EngineRequest:
        """As ``AsyncEngineClient.make_request`` (every replica serves the same model)."""
        if request_id in self._owner:
            raise ValueError(f"request id {request_id!r} is already in flight")
        return self.replicas[0].make_request(request_id, prompt_token_ids, params,
                                             cache_salt=cache_salt, grammar=grammar)

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """As ``AsyncEngineClient.generate``, on the least-loaded replica."""
        request_id = request.request_id
        if request_id in self._owner:
            raise ValueError(f"request id {request_id!r} is already in flight")
        replica = self._pick()
        self._owner[request_id] = replica
        try:
            async for out in replica.generate(request):
                yield out
        finally:
            self._owner.pop(request_id, None)

    async def encode(self, inputs: list[PoolingInput],
                     params: PoolingParams) -> list[PoolingOutput]:
        """As ``AsyncEngineClient.encode``, on the least-loaded replica."""
        return await self._pick().encode(inputs, params)

    async def abort(self, request_id: str) -> None:
        replica = self._owner.get(request_id)
        if replica is not None:
            await replica.abort(request_id)

    async def shutdown(self, drain_timeout: float = 30.0) -> None:
        await asyncio.gather(*(r.shutdown(drain_timeout) for r in self.replicas))
