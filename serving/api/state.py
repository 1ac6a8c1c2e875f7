"""``ServerState``: everything a route handler reads, attached to ``app.ctx.state``.

Lifecycle (driven by the listeners in ``serving.api.app``): created with the app; ``engine``,
``renderer``, ``tokens`` and ``metrics`` are filled once the engine has loaded (in the background,
so ``/ready`` can answer 503 while the model loads); ``draining`` turns True on SIGTERM.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from serving.api.admission import Admission
from serving.api.args import ServerArgs
from serving.api.engine_protocol import EngineClient, PoolingEngineClient, ServingEngine
from serving.api.errors import BadRequest, NotFound, ServiceUnavailable
from serving.api.metrics import ServerMetrics
from serving.api.template_worker import TemplateWorkers
from serving.api.tokens import TokenTexts

T = TypeVar("T")


@dataclass
class ServerState:
    args: ServerArgs
    model_root: str = ""  # what /v1/models reports as "root": the model path or alias
    engine: ServingEngine | None = None
    renderer: TemplateWorkers | None = None
    tokens: TokenTexts | None = None
    metrics: ServerMetrics | None = None
    admission: Admission | None = None  # set with the engine (its limits need --max-num-seqs)
    served_names: list[str] = field(default_factory=list)
    load_error: str | None = None
    draining: bool = False
    in_flight: int = 0  # admitted requests being served (for the SIGTERM drain)
    exit_code: int = 0
    cpu_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize"))

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.metrics is not None and \
            self.admission is not None

    def require_engine(self) -> ServingEngine:
        """The engine, or a 503 while loading, draining or after the engine died."""
        if self.draining:
            raise ServiceUnavailable("The server is shutting down.")
        if self.engine is None:
            raise ServiceUnavailable(self.load_error or "The model is still loading; retry soon.")
        if not self.engine.is_healthy():
            raise ServiceUnavailable("The engine has stopped; the server cannot generate.")
        return self.engine

    @property
    def tasks(self) -> tuple[str, ...]:
        """What the loaded engine serves (an engine without ``supported_tasks`` generates)."""
        tasks: tuple[str, ...] = getattr(self.engine, "supported_tasks", ("generate",))
        return tasks

    def require_generate(self, api: str) -> EngineClient:
        """The generation engine, or 400 "The model does not support <api>" (vLLM's words)
        when a pooling model is served."""
        engine = self.require_engine()
        if "generate" not in self.tasks:
            raise BadRequest(f"The model does not support {api}")
        return cast(EngineClient, engine)

    def require_pooling(self, api: str, *tasks: str) -> PoolingEngineClient:
        """The pooling engine if it serves one of ``tasks``, else 400 "The model does not
        support <api>"."""
        engine = self.require_engine()
        if not set(tasks) & set(self.tasks):
            raise BadRequest(f"The model does not support {api}")
        return cast(PoolingEngineClient, engine)

    def resolve_model(self, requested: str | None) -> str:
        """The served name to answer with; ``None`` or "" means the first served name."""
        if not self.served_names:
            raise ServiceUnavailable(self.load_error or "The model is still loading; retry soon.")
        if not requested:
            return self.served_names[0]
        if requested in self.served_names:
            return requested
        raise NotFound(f"The model `{requested}` does not exist.", param="model")

    async def off_loop(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run CPU work (tokenization, detokenization) in the worker pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.cpu_pool, functools.partial(fn, *args, **kwargs))
