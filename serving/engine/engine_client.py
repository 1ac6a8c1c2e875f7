"""AsyncEngineClient: the asyncio face of the one engine, for the HTTP layer.

``make_request`` validates a generation request and ``generate`` streams its outputs; ``encode``
validates and pools a batch of inputs (each one an engine request, so they share steps with
whatever else is running). Validation runs once, on the caller's thread (``InputProcessor``: a
``ValueError`` is a 400 before anything is queued).

The engine runs in one dedicated thread (XLA releases the GIL while a step computes, so the event
loop stays responsive). Requests cross into that thread through a locked command list; each
step's ``SeqOutput``s come back through ``loop.call_soon_threadsafe`` and are turned into text and
results on the event loop (``OutputProcessor``: detokenization and stop strings never run on the
engine thread). If the engine thread crashes, every in-flight request ends with finish_reason
"error", ``is_healthy()`` turns False, and new requests are refused: nothing hangs.

Reliability (docs/RELIABILITY.md):
- progress watchdog: a step that has not returned after ``--engine-step-timeout`` seconds is a
  hang, handled like a crash (the hung thread is a daemon; the process can still exit);
- aborts (client disconnects, shutdown) come back as outputs with finish_reason "abort", so a
  response still being written ends with that reason instead of waiting;
- each time the engine goes idle it runs its leak self-check (``LLMEngine.check_idle``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import traceback
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from serving.engine.config import EngineArgs
from serving.engine.engine import EngineStats, LLMEngine
from serving.engine.output_processor import OutputProcessor
from serving.engine.outputs import CompletionDelta, RequestOutput, SeqOutput
from serving.engine.pooling_params import PoolingInput, PoolingOutput, PoolingParams
from serving.engine.request import EngineRequest
from serving.engine.sampling_params import SamplingParams
from serving.engine.structured_output import CompiledGrammar, GrammarBackend

log = logging.getLogger("xlaserve.client")


class EngineDeadError(RuntimeError):
    pass


class AsyncEngineClient:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.model_name: str = engine.loaded.name
        self.max_model_len: int = engine.max_model_len
        self.max_num_seqs: int = engine.sched_cfg.max_num_seqs
        self.vocab_size: int = engine.model_config.vocab_size
        self.tokenizer: Any = engine.tokenizer
        self.generation_defaults: dict[str, Any] = engine.generation_defaults()
        self.supported_tasks: tuple[str, ...] = engine.tasks
        self.processor = engine.input_processor()
        self.grammars: GrammarBackend | None = engine.grammars  # thread-safe compile
        self.outputs = OutputProcessor(engine.tokenizer, engine.pooling_post())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._pooling: dict[str, asyncio.Future[PoolingOutput]] = {}
        self._pool_ids = itertools.count()
        self._encodes = 0  # encode() calls in flight
        self._commands: list[tuple[str, Any]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.step_timeout = engine.args.engine_step_timeout
        self._step_started: float | None = None  # monotonic start of the running step
        self.error: str | None = None
        self._stats = engine.get_stats()

    @classmethod
    def from_args(cls, args: EngineArgs) -> AsyncEngineClient:
        return cls(LLMEngine(args))

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="xlaserve-engine", daemon=True)
        self._thread.start()
        if self.step_timeout > 0:
            self._watchdog = asyncio.create_task(self._watch_progress(), name="engine-watchdog")

    def is_healthy(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    def stats(self) -> EngineStats:
        """The counters of the last step; the grammar cache's size is read now (grammars are
        compiled by the API's workers, between steps)."""
        if self.grammars is None:
            return self._stats
        return replace(self._stats, num_cached_grammars=self.grammars.cache_size)

    @property
    def num_in_flight(self) -> int:
        return len(self._queues) + self._encodes

    # ---- pooling models ----------------------------------------------------------------------
    @property
    def info(self) -> Any:
        """``PoolingModelInfo`` of a pooling model (None for a generation model)."""
        return self.engine.facts.pooling

    @property
    def labels(self) -> list[str]:
        """Class names of a classifier, by class index ("LABEL_i" where the config has none)."""
        cfg = self.engine.model_config
        names = dict(getattr(cfg, "id2label", ()))
        return [names.get(i, f"LABEL_{i}") for i in range(getattr(cfg, "num_labels", 0))]

    def tokenize(self, texts: list[str], *, add_special_tokens: bool = True,
                 truncate_prompt_tokens: int | None = None) -> list[PoolingInput]:
        return self.processor.tokenize(texts, add_special_tokens=add_special_tokens,
                                       truncate_prompt_tokens=truncate_prompt_tokens)

    def tokenize_pairs(self, texts_1: list[str], texts_2: list[str], *,
                       truncate_prompt_tokens: int | None = None) -> list[PoolingInput]:
        return self.processor.tokenize_pairs(texts_1, texts_2,
                                             truncate_prompt_tokens=truncate_prompt_tokens)

    # ---- requests ----------------------------------------------------------------------------
    def _check_health(self) -> None:
        if not self.is_healthy():
            raise EngineDeadError(self.error or "the engine is not running")

    def make_request(self, request_id: str, prompt_token_ids: list[int],
                     params: SamplingParams, *, cache_salt: str | None = None,
                     grammar: CompiledGrammar | None = None) -> EngineRequest:
        """Validate a generation request (the only validation it gets): a ``RequestError``
        (``ValueError``, a 400 for the server) names what is wrong; nothing is queued.
        ``grammar``: ``params.structured`` compiled by ``grammars`` (off the event loop)."""
        return self.processor.sampling_request(request_id, prompt_token_ids, params,
                                               cache_salt=cache_salt, grammar=grammar)

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Stream the outputs of a request from ``make_request``; leaving the loop early
        (break, cancel, disconnect) aborts it. Raises EngineDeadError if the engine is down."""
        self._check_health()
        request_id = request.request_id
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in flight")
        q: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[request_id] = q
        self.outputs.add(request)
        self._submit("add", [request])
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
            self.outputs.drop(request_id)
            if not finished:
                self._submit("abort", [request_id])

    async def encode(self, inputs: list[PoolingInput],
                     params: PoolingParams) -> list[PoolingOutput]:
        """Validate, truncate and pool ``inputs``; results in input order.

        Raises ``ValueError`` (a 400) for invalid params or inputs, before anything is queued;
        ``EngineDeadError`` when the engine is not running. Cancelling aborts every input.
        """
        self.processor.check_pooling(params)
        base = f"pool-{next(self._pool_ids)}"
        specs = [self.processor.pooling_request(f"{base}-{i}", x, params)
                 for i, x in enumerate(inputs)]
        if not specs:
            return []
        self._check_health()
        loop = asyncio.get_running_loop()
        futures = []
        for spec in specs:
            fut: asyncio.Future[PoolingOutput] = loop.create_future()
            self._pooling[spec.request_id] = fut
            self.outputs.add(spec)
            futures.append(fut)
        self._submit("add", specs)
        self._encodes += 1
        try:
            return list(await asyncio.gather(*futures))
        finally:
            self._encodes -= 1
            pending = [s.request_id for s, f in zip(specs, futures, strict=True) if not f.done()]
            for spec in specs:
                self._pooling.pop(spec.request_id, None)
                self.outputs.drop(spec.request_id)
            if pending:
                self._submit("abort", pending)

    async def abort(self, request_id: str) -> None:
        self._submit("abort", [request_id])

    def _submit(self, kind: str, payload: Any) -> None:
        with self._lock:
            self._commands.append((kind, payload))
        self._wake.set()

    # ---- the event loop's side ---------------------------------------------------------------
    def _on_outputs(self, outs: list[SeqOutput]) -> None:
        res = self.outputs.process(outs)
        for out in res.outputs:
            q = self._queues.get(out.request_id)
            if q is not None:
                q.put_nowait(out)
        if res.stopped:
            self._submit("finish", res.stopped)
        for rid, pooled in res.pooled:
            fut = self._pooling.get(rid)
            if fut is not None and not fut.done():
                fut.set_result(pooled)
        for rid in res.failed:
            fut = self._pooling.get(rid)
            if fut is not None and not fut.done():
                fut.set_exception(EngineDeadError(f"pooling request {rid} was aborted"))

    def _fail(self, rids: list[str], exc: BaseException) -> None:
        for rid in rids:
            q = self._queues.get(rid)
            if q is not None:
                q.put_nowait(exc)
            fut = self._pooling.get(rid)
            if fut is not None and not fut.done():
                fut.set_exception(exc)

    def _fail_all(self) -> None:
        for rid, q in list(self._queues.items()):
            deltas = [CompletionDelta(0, [], "", None, "error")]
            q.put_nowait(RequestOutput(rid, [], deltas, finished=True, error=self.error))
        for fut in list(self._pooling.values()):
            if not fut.done():
                fut.set_exception(EngineDeadError(self.error or "the engine died"))

    # ---- the engine thread -------------------------------------------------------------------
    def _apply(self, eng: LLMEngine, kind: str, payload: Any) -> None:
        assert self._loop is not None
        if kind == "add":
            for spec in payload:
                assert isinstance(spec, EngineRequest)
                try:
                    eng.add_request(spec)
                except ValueError as e:
                    self._loop.call_soon_threadsafe(self._fail, [spec.request_id], e)
        elif kind == "abort":
            outs = [o for rid in payload for o in eng.abort(rid)]
            if outs:  # a response still being written ends with finish_reason "abort"
                self._loop.call_soon_threadsafe(self._on_outputs, outs)
        elif kind == "finish":
            for rid, index in payload:
                eng.finish_sequence(rid, index)

    def _run(self) -> None:
        eng = self.engine
        assert self._loop is not None
        busy = False  # something happened since the last idle self-check
        try:
            while not self._stop and self.error is None:
                with self._lock:
                    cmds, self._commands = self._commands, []
                for kind, payload in cmds:
                    self._apply(eng, kind, payload)
                busy = busy or bool(cmds)
                if eng.has_work:
                    self._step_started = time.monotonic()
                    outs = eng.step()
                    self._step_started = None
                    busy = True
                    self._stats = eng.get_stats()
                    if outs and self.error is None:
                        self._loop.call_soon_threadsafe(self._on_outputs, outs)
                else:
                    if busy:
                        eng.check_idle()
                        busy = False
                    self._stats = eng.get_stats()
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
        except Exception as e:  # the engine is broken: fail everything, report unhealthy
            self.error = f"engine loop crashed: {type(e).__name__}: {e}"
            log.error("%s\n%s", self.error, traceback.format_exc())
            self._loop.call_soon_threadsafe(self._fail_all)

    async def _watch_progress(self) -> None:
        """The progress watchdog: a step running longer than ``step_timeout`` is a hang."""
        while self.error is None and not self._stop:
            await asyncio.sleep(min(0.5, self.step_timeout / 4))
            started = self._step_started
            if started is not None and time.monotonic() - started > self.step_timeout \
                    and self.error is None:
                self.error = (f"engine step has not returned after {self.step_timeout:g} s "
                              "(--engine-step-timeout): the engine is hung")
                log.error("%s", self.error)
                self._fail_all()

    async def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Let in-flight requests finish for up to ``drain_timeout`` seconds, then abort the
        rest (their streams end with finish_reason "abort") and stop the engine thread."""
        deadline = time.monotonic() + drain_timeout
        while (self._queues or self._pooling) and time.monotonic() < deadline \
                and self.is_healthy():
            await asyncio.sleep(0.05)
        if self._queues and self.is_healthy():
            self._submit("abort", list(self._queues))
            end = time.monotonic() + 2.0  # the aborts' outputs reach their requests
            while self._queues and time.monotonic() < end and self.is_healthy():
                await asyncio.sleep(0.02)
        if self._pooling:
            self._submit("abort", list(self._pooling))
            exc = EngineDeadError("the engine was shut down")
            for fut in list(self._pooling.values()):
                if not fut.done():
                    fut.set_exception(exc)
        self._stop = True
        self._wake.set()
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._thread is not None and self.error is None:  # a hung thread is not waited for
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)
