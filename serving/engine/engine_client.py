"""AsyncEngineClient: the asyncio face of the engine, for the HTTP layer.

The engine runs in one dedicated thread (XLA releases the GIL while a step computes, so the event
loop stays responsive). Requests cross into that thread through a locked command list; outputs
come back once per step through ``loop.call_soon_threadsafe`` into per-request asyncio queues.
If the engine thread crashes, every in-flight request ends with finish_reason "error",
``is_healthy()`` turns False, and new requests are refused: nothing hangs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import traceback
from collections.abc import AsyncIterator
from typing import Any

from serving.engine.config import EngineArgs
from serving.engine.engine import EngineStats, LLMEngine
from serving.engine.outputs import CompletionDelta, RequestOutput
from serving.engine.sampling_params import SamplingParams

log = logging.getLogger("xlaserve.client")


class EngineDeadError(RuntimeError):
    pass


class AsyncEngineClient:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.model_name: str = engine.loaded.name
        self.max_model_len: int = engine.max_model_len
        self.vocab_size: int = engine.model_config.vocab_size
        self.tokenizer: Any = engine.tokenizer
        self.generation_defaults: dict[str, Any] = engine.generation_defaults()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._commands: list[tuple[str, Any]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.error: str | None = None
        self._stats = engine.get_stats()

    @classmethod
    def from_args(cls, args: EngineArgs) -> AsyncEngineClient:
        return cls(LLMEngine(args))

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="xlaserve-engine", daemon=True)
        self._thread.start()

    def is_healthy(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    def stats(self) -> EngineStats:
        return self._stats

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    # ---- requests ----------------------------------------------------------------------------
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str, *, cache_salt: str | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Stream outputs; leaving the loop early (break, cancel, disconnect) aborts the request.

        Raises ValueError (a 400 for the server) before anything is queued if the request is
        invalid, and EngineDeadError if the engine is down.
        """
        if not self.is_healthy():
            raise EngineDeadError(self.error or "the engine is not running")
        prompt_token_ids = self.engine.validate(list(prompt_token_ids), params)
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in flight")
        q: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[request_id] = q
        self._submit("add", (request_id, prompt_token_ids, params, cache_salt))
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._submit("abort", request_id)

    async def abort(self, request_id: str) -> None:
        self._submit("abort", request_id)

    def _submit(self, kind: str, payload: Any) -> None:
        with self._lock:
            self._commands.append((kind, payload))
        self._wake.set()

    # ---- the engine thread -------------------------------------------------------------------
    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            q = self._queues.get(out.request_id)
            if q is not None:
                q.put_nowait(out)

    def _run(self) -> None:
        eng = self.engine
        assert self._loop is not None
        try:
            while not self._stop:
                with self._lock:
                    cmds, self._commands = self._commands, []
                for kind, payload in cmds:
                    if kind == "add":
                        rid, ids, params, salt = payload
                        try:
                            eng.add_request(rid, ids, params, cache_salt=salt)
                        except ValueError as e:
                            self._loop.call_soon_threadsafe(self._fail, rid, e)
                    elif kind == "abort":
                        eng.abort(payload)
                if eng.has_work:
                    outs = eng.step()
                    self._stats = eng.get_stats()
                    if outs:
                        self._loop.call_soon_threadsafe(self._deliver, outs)
                else:
                    self._stats = eng.get_stats()
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
        except Exception as e:  # the engine is broken: fail everything, report unhealthy
            self.error = f"engine loop crashed: {type(e).__name__}: {e}"
            log.error("%s\n%s", self.error, traceback.format_exc())
            self._loop.call_soon_threadsafe(self._fail_all)

    def _fail(self, rid: str, exc: BaseException) -> None:
        q = self._queues.get(rid)
        if q is not None:
            q.put_nowait(exc)

    def _fail_all(self) -> None:
        for rid, q in list(self._queues.items()):
            deltas = [CompletionDelta(0, [], "", None, "error")]
            q.put_nowait(RequestOutput(rid, [], deltas, finished=True, error=self.error))

    async def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Let in-flight requests finish for up to ``drain_timeout`` seconds, then stop."""
        deadline = time.monotonic() + drain_timeout
        while self._queues and time.monotonic() < deadline and self.is_healthy():
            await asyncio.sleep(0.05)
        for rid in list(self._queues):
            await self.abort(rid)
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)
