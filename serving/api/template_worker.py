"""Chat templates render in worker processes: a template cannot stall, bloat or crash the server.

Who calls: ``serving.api.app`` starts one ``TemplateWorkers`` when the engine is ready; the chat
and tokenize routes call ``TemplateWorkers.render`` per request. The workers run this module
(``python -m serving.api.template_worker``) and render with ``chat_template.ChatRenderer``, whose
Jinja sandbox and in-sandbox deadline stay the first line of defence.

Why processes: the sandbox's deadline stops a template between two operations, not inside one
long C call (squaring a megabyte-sized integer takes minutes), and such a call holds the GIL, so
in a thread it would stall the event loop and every other request with it. A process can be
killed, and it can be given a memory limit.

Contract:
- ``workers`` persistent processes, started with the server; each compiles the server's template
  once and caches request templates. A render is one round trip over the worker's pipes (a
  length-prefixed JSON frame each way, never pickle: nothing template code could influence is
  unpickled by the server);
- each worker's address space is limited to ``memory_bytes`` (``RLIMIT_AS``): an allocation past it
  is a ``MemoryError`` inside the worker, answered as a ``ChatTemplateError``;
- a render that has not answered ``KILL_GRACE_S`` after its ``render_timeout`` gets its worker
  killed (SIGKILL) and a ``ChatTemplateError``; so does a worker that dies or answers garbage.
  A fresh worker replaces it on its next use;
- a worker dies with the server (Linux ``PR_SET_PDEATHSIG``), even one stuck in a C call, so a
  server that is killed leaves no template burning CPU;
- a request waits at most ``render_timeout`` for a free worker, then gets ``TemplateWorkersBusy``
  (the routes answer 503);
- a caller that is cancelled (client disconnect) does not lose the worker: the render finishes
  (or is killed) in the background and the worker returns to the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import struct
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, BinaryIO

import serving
from serving.api.chat_template import ChatRenderer, ChatTemplateError, check_server_template

logger = logging.getLogger("xlaserve.api")

# Past render_timeout, how long a worker has before it is killed (its own deadline normally
# answers first, as soon as the template returns to the sandbox).
KILL_GRACE_S = 1.0
# Largest frame either side accepts: a rendered prompt is bounded by the request body plus the
# template's own text; anything larger is an attack on the tokenizer.
MAX_FRAME_BYTES = 64 * 1024 * 1024
DEFAULT_MEMORY_BYTES = 512 * 1024 * 1024
START_TIMEOUT_S = 30.0
_HEADER = struct.Struct(">I")


class TemplateWorkersBusy(RuntimeError):
    """Every template worker stayed busy for the whole ``render_timeout``."""


def _frame(obj: Any) -> bytes:
    data = json.dumps(obj).encode()
    return _HEADER.pack(len(data)) + data


class _Worker:
    """One worker process and its pipes (used by one render at a time)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        assert proc.stdin is not None and proc.stdout is not None
        self.stdin = proc.stdin
        self.stdout = proc.stdout
        self.killed = False

    @property
    def alive(self) -> bool:
        return not self.killed and self.proc.returncode is None

    async def call(self, request: Mapping[str, Any]) -> Any:
        """Send one frame and read one; ``ValueError`` when the reply is not a JSON frame."""
        self.stdin.write(_frame(request))
        await self.stdin.drain()
        (size,) = _HEADER.unpack(await self.stdout.readexactly(_HEADER.size))
        if size > MAX_FRAME_BYTES:
            raise ValueError(f"the rendered prompt is larger than {MAX_FRAME_BYTES} bytes")
        return json.loads(await self.stdout.readexactly(size))

    def kill(self) -> None:
        if self.alive:
            self.killed = True  # returncode is set only once the process is reaped
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


class TemplateWorkers:
    """A pool of template worker processes; build with ``await TemplateWorkers.start(...)``.

    ``template`` is the server's template (None: chat requests need a request template, or get
    the "no chat template" 400 from the worker); ``content_format`` and ``special_tokens`` are
    as for ``ChatRenderer``.
    """

    def __init__(self, config: dict[str, Any], workers: int, render_timeout: float) -> None:
        self._config = config
        self.render_timeout = render_timeout
        self._idle: asyncio.Queue[_Worker | None] = asyncio.Queue()
        self._all: set[_Worker] = set()
        self._background: set[asyncio.Task[Any]] = set()
        for _ in range(workers):
            self._idle.put_nowait(None)  # a slot; its process starts on first use
        self.kills = 0

    @classmethod
    async def start(cls, template: str | None, *, content_format: str = "auto",
                    special_tokens: Mapping[str, str] | None = None,
                    render_timeout: float, memory_bytes: int = DEFAULT_MEMORY_BYTES,
                    workers: int = 2) -> TemplateWorkers:
        """Check the server's template here (``ChatTemplateError``), then start every worker;
        ``RuntimeError`` when a worker cannot start (for instance, a memory limit too small)."""
        if template is not None:
            check_server_template(template, content_format)
        config = {"template": template, "content_format": content_format,
                  "special_tokens": dict(special_tokens or {}), "render_timeout": render_timeout,
                  "memory_bytes": memory_bytes, "server_pid": os.getpid()}
        pool = cls(config, workers, render_timeout)
        slots = [pool._idle.get_nowait() for _ in range(workers)]
        try:
            started = await asyncio.gather(*(pool._spawn() for _ in slots))
        except BaseException:
            await pool.close()
            raise
        for w in started:
            pool._idle.put_nowait(w)
        return pool

    async def _spawn(self) -> _Worker:
        env = dict(os.environ)
        # The worker imports this package from where the server imported it.
        root = os.path.dirname(os.path.dirname(os.path.abspath(serving.__file__)))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        with warnings.catch_warnings():
            # JAX warns on any fork; the child here execs at once and runs no inherited thread.
            warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called",
                                    category=RuntimeWarning)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "serving.api.template_worker", env=env,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        worker = _Worker(proc)
        self._all.add(worker)
        try:
            reply = await asyncio.wait_for(worker.call(self._config), START_TIMEOUT_S)
        except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError) as e:
            worker.kill()
            raise RuntimeError(f"a chat template worker failed to start: {e!r}") from None
        if reply.get("error"):
            worker.kill()
            raise RuntimeError(f"a chat template worker failed to start: {reply['error']}")
        return worker

    async def render(self, messages: Sequence[Mapping[str, Any]], *,
                     add_generation_prompt: bool = True, continue_final_message: bool = False,
                     documents: list[dict[str, str]] | None = None,
                     tools: list[dict[str, Any]] | None = None,
                     template_kwargs: Mapping[str, Any] | None = None,
                     template: str | None = None) -> str:
        """The rendered prompt (see ``ChatRenderer.render_sync`` for the arguments); raises
        ``ChatTemplateError`` (a 400) or ``TemplateWorkersBusy`` (a 503)."""
        request = {"messages": list(messages), "add_generation_prompt": add_generation_prompt,
                   "continue_final_message": continue_final_message, "documents": documents,
                   "tools": tools, "template_kwargs": dict(template_kwargs or {}),
                   "template": template}
        try:
            slot = await asyncio.wait_for(self._idle.get(), self.render_timeout)
        except TimeoutError:
            raise TemplateWorkersBusy("Every chat template worker is busy; retry soon.") from None
        task = asyncio.ensure_future(self._render_in(slot, request))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        # Shielded: a cancelled caller leaves the render to finish and free its worker.
        return await asyncio.shield(task)

    async def _render_in(self, worker: _Worker | None, request: Mapping[str, Any]) -> str:
        t0 = time.monotonic()
        try:
            if worker is None or not worker.alive:
                if worker is not None:
                    self._all.discard(worker)
                worker = await self._spawn()
            try:
                reply = await asyncio.wait_for(worker.call(request),
                                               self.render_timeout + KILL_GRACE_S)
            except TimeoutError:
                self._kill(worker, f"still rendering after {time.monotonic() - t0:.1f} s")
                raise ChatTemplateError(
                    "Chat template rendering exceeded its time limit of "
                    f"{self.render_timeout:g} s; the renderer was stopped.") from None
            except (OSError, ValueError, asyncio.IncompleteReadError) as e:
                self._kill(worker, f"it failed: {e!r}")
                raise ChatTemplateError(
                    "The chat template worker stopped while rendering (it may have exceeded its "
                    "memory budget).") from None
            if isinstance(reply, dict) and "error" in reply:
                raise ChatTemplateError(str(reply["error"]))
            text = reply.get("text") if isinstance(reply, dict) else None
            if not isinstance(text, str):
                self._kill(worker, "it answered without text")
                raise ChatTemplateError("The chat template worker answered without a prompt.")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ChatTemplateError("The chat template rendered an invalid Unicode character "
                                        "(a lone surrogate).") from None
            return text
        except ChatTemplateError:
            raise
        except BaseException:
            if worker is not None and worker.alive:
                # Cancelled (the server is stopping) mid-frame: its pipe may hold half a reply.
                self._kill(worker, "its render was interrupted")
            raise
        finally:
            self._idle.put_nowait(worker)

    def _kill(self, worker: _Worker, why: str) -> None:
        self.kills += 1
        logger.warning("Killed chat template worker pid %d: %s", worker.proc.pid, why)
        worker.kill()

    async def close(self) -> None:
        """Kill every worker and reap it (the server is stopping)."""
        for task in list(self._background):
            task.cancel()
        for worker in self._all:
            worker.kill()
        await asyncio.gather(*(w.proc.wait() for w in self._all), return_exceptions=True)
        self._all.clear()


# --------------------------------------------------------------------------------------------
# The worker process
# --------------------------------------------------------------------------------------------


def _read_frame(stream: BinaryIO) -> Any:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None  # the server closed the pipe
    (size,) = _HEADER.unpack(header)
    return json.loads(stream.read(size))


def _write_frame(stream: BinaryIO, obj: Any) -> None:
    stream.write(_frame(obj))
    stream.flush()


def _render(renderer: ChatRenderer, request: dict[str, Any]) -> dict[str, Any]:
    try:
        return {"text": renderer.render_sync(
            request["messages"], add_generation_prompt=request["add_generation_prompt"],
            continue_final_message=request["continue_final_message"],
            documents=request["documents"], tools=request["tools"],
            template_kwargs=request["template_kwargs"], template=request["template"])}
    except ChatTemplateError as e:
        return {"error": str(e)}
    except MemoryError:
        return {"error": "Chat template failed to render: MemoryError (the template exceeded "
                         "its memory budget)."}


def _die_with_parent() -> None:
    """SIGKILL this process when the thread that spawned it (the server's event loop) dies."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def main() -> None:
    """Serve render requests on stdin/stdout until stdin closes. Frame 1 is the config."""
    import resource

    _die_with_parent()
    requests, replies = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print goes to the server's log, never into the reply pipe
    config = _read_frame(requests)
    if config is None or os.getppid() != config["server_pid"]:
        return  # the server is gone already (it died before the death signal was armed)
    resource.setrlimit(resource.RLIMIT_AS, (config["memory_bytes"], config["memory_bytes"]))
    try:
        renderer = ChatRenderer(config["template"], content_format=config["content_format"],
                                special_tokens=config["special_tokens"],
                                render_timeout=config["render_timeout"])
    except (ChatTemplateError, MemoryError) as e:
        _write_frame(replies, {"error": str(e) or type(e).__name__})
        return
    _write_frame(replies, {"ready": True})
    while (request := _read_frame(requests)) is not None:
        _write_frame(replies, _render(renderer, request))


if __name__ == "__main__":
    main()
