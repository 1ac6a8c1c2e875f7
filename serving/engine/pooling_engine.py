"""The pooling engine: an async client over a background thread that batches pooling requests.

Models: BERT-family encoders and cross-encoders (``PoolingRunner``), and decoder (Llama-family)
models served as embedding models with ``--task embed`` (``pooling_decoder.DecoderPoolingRunner``:
a causal prefill, LAST + normalize by default, as vLLM). Both runners share the batch grid of
``pooling_runner.BucketedRunner``, so batch forming below is the same for either.

Who calls it: the HTTP layer (``/v1/embeddings``, ``/pooling``, ``/score``, ``/rerank``) and
tests, from an asyncio event loop. ``encode``/``embed`` validate a request on the caller's thread
(raising ``ValueError`` -> 400), queue its sequences and await a future. One background thread
("pooling-engine") owns the device: each step it takes pending sequences, forms one batch that
fits a precompiled ``(S, T)`` bucket of the runner, runs it, and hands results back to the
callers' loops with ``call_soon_threadsafe``. Requests that arrive while a step runs join the
next step, so concurrent HTTP requests share batches.

Batch forming (``_take_batch``), per step:
1. the oldest pending sequence fixes the output kind and the token bucket T (so nothing starves);
2. later sequences of the same kind that fit T join in arrival order, up to the bucket's
   capacity ``max_batch(T)``;
3. a large batch whose size is not a bucket is cut to the largest bucket below it (the rest
   waits one step, possibly with new company), which never pads more rows than rounding up.

Invariants: a request's outputs come back in input order; a sequence's result does not depend
on which other sequences shared its step (rows are independent; only float summation order
varies with the padded shape). The engine never compiles after ``start()`` (see
``PoolingRunner.num_compiles``).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from models.bert import BertConfig, is_encoder_dir, load_bert, read_config
from models.hf_dir import encoder_tokenizer, resolve_max_model_len
from models.loader import resolve_source
from models.pooling import (
    PoolerConfig,
    apply_activation,
    classify_activation,
    l2_normalize_np,
    resolve_pooler_config,
    score_activation,
)
from models.registry import ModelLoadError, resolve_dtype
from serving.engine.engine import enable_compilation_cache
from serving.engine.engine_client import EngineDeadError
from serving.engine.pooling_params import (
    PoolingInput,
    PoolingModelInfo,
    PoolingOutput,
    PoolingParams,
)
from serving.engine.pooling_runner import BucketedRunner, PoolingRunner

logger = logging.getLogger(__name__)

__all__ = ["EngineDeadError", "PoolingEngine", "PoolingInput", "PoolingOutput", "PoolingStats"]

_KIND_OF_TASK = {"embed": "pooled", "encode": "hidden", "classify": "logits", "score": "logits"}
# Wording of the too-long error per task (vLLM's "... tokens in the input for <what>").
_TASK_WHAT = {"embed": "embedding generation", "encode": "embedding generation",
              "classify": "classification", "score": "score"}
# Batches at least this large are cut to a bucket size rather than padded up.
SPLIT_MIN_BATCH = 16
# How many pending sequences one step looks through when filling a batch.
SCAN_WINDOW = 4096


@dataclass
class PoolingStats:
    """Engine counters. The first block has the generation engine's names, so the server's
    metrics collector reads either engine (a pooling engine has no KV cache: zeros)."""

    num_running: int = 0  # requests awaiting results
    num_waiting: int = 0  # sequences queued for a step
    kv_pages_used: int = 0
    kv_pages_total: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_steps: int = 0
    num_recompiles: int = 0  # compiled after warmup (should stay 0)
    prompt_tokens_total: int = 0  # real (unpadded) tokens pooled
    generation_tokens_total: int = 0
    # Pooling only.
    num_sequences: int = 0  # sequences pooled
    num_padded_tokens: int = 0  # token slots computed (S * T, or P packed), summed
    num_compiles: int = 0  # executables compiled, warmup included


class PoolingModelConfig(Protocol):
    """What the engine reads about its model: ``models.bert.BertConfig`` for encoders,
    ``pooling_decoder.DecoderPoolingConfig`` for decoders."""

    @property
    def architecture(self) -> str: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def type_vocab_size(self) -> int: ...
    @property
    def num_labels(self) -> int: ...
    @property
    def problem_type(self) -> str | None: ...
    @property
    def cross_encoder_activation(self) -> str | None: ...
    @property
    def id2label(self) -> tuple[tuple[int, str], ...]: ...
    @property
    def matryoshka_dimensions(self) -> tuple[int, ...] | None: ...
    @property
    def is_matryoshka(self) -> bool: ...


@dataclass
class _Request:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[PoolingOutput]]
    params: PoolingParams
    results: list[PoolingOutput | None]
    remaining: int
    failed: bool = False


@dataclass
class _Item:
    request: _Request
    index: int
    kind: str
    token_ids: list[int]
    token_type_ids: list[int] | None
    seq_no: int = field(default=0)


class PoolingEngine:
    """Serves one pooling model. Construct with ``from_args``, or directly in tests."""

    def __init__(
        self,
        runner: BucketedRunner,
        model_config: PoolingModelConfig,
        pooler_config: PoolerConfig,
        tokenizer: Any = None,
        *,
        model_name: str = "",
    ):
        self.runner = runner
        self.model_config = model_config
        self.pooler_config = pooler_config
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.generation_defaults: dict[str, Any] = {}  # the server's interface; none here
        self.max_model_len = runner.max_model_len
        if runner.is_classifier:
            tasks: tuple[str, ...] = ("classify", "score")
        else:
            tasks = ("embed", "encode")
        self.info = PoolingModelInfo(
            tasks=tasks,
            hidden_size=model_config.hidden_size,
            max_model_len=self.max_model_len,
            num_labels=model_config.num_labels,
            is_matryoshka=model_config.is_matryoshka,
            matryoshka_dimensions=model_config.matryoshka_dimensions,
        )
        self._classify_act = classify_activation(model_config.num_labels,
                                                 model_config.problem_type)
        self._score_act = score_activation(model_config.num_labels, model_config.problem_type,
                                           model_config.cross_encoder_activation)
        self._cv = threading.Condition()
        self._pending: collections.deque[_Item] = collections.deque()
        self._seq_counter = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead: BaseException | None = None
        self._in_flight = 0
        self._stats = PoolingStats()
        # Compiled shape -> steps run with it; read by tests and the bench. Encoders: (S, T);
        # decoders: (sequence rows, packed tokens P).
        self.step_sizes: collections.Counter[tuple[int, int]] = collections.Counter()

    # ------------------------------------------------------------------------- construction

    @classmethod
    def from_args(cls, args: Any, *, warmup: bool = True) -> PoolingEngine:
        """Load the model named by an ``EngineArgs``-like object and compile its buckets.

        Reads: model (asset alias, HF directory, GGUF file; None: the default asset), task,
        tokenizer, dtype, max_model_len, max_num_seqs, max_num_batched_tokens, cache_dir,
        compilation_cache, and, where present, override_pooler_config (JSON string or dict),
        attention_backend and block_size (decoders). A BERT-family directory runs on the
        encoder runner; anything else is loaded as a decoder embedding model (task auto or
        embed). ``await start()`` then starts serving. Raises ``ModelLoadError`` for a model
        that is missing, of an unsupported family, or does not fit ``task``.
        """
        cache_dir = getattr(args, "cache_dir", None)
        source = Path(resolve_source(args.model, cache_dir))
        if getattr(args, "compilation_cache", False):
            enable_compilation_cache(cache_dir)
        if is_encoder_dir(source):
            engine = cls._encoder_from_args(args, source)
        else:
            engine = cls._decoder_from_args(args, source)
        if warmup:
            engine.runner.warmup()
        return engine

    @classmethod
    def _encoder_from_args(cls, args: Any, model_dir: Path) -> PoolingEngine:
        try:
            cfg = read_config(model_dir)
            dtype = resolve_dtype(getattr(args, "dtype", "auto"), encoder=True)
            max_model_len = resolve_max_model_len(
                model_dir, cfg, getattr(args, "max_model_len", None))
            pooler = resolve_pooler_config(
                model_dir, override=getattr(args, "override_pooler_config", None))
            model = load_bert(model_dir, dtype)
            runner = PoolingRunner(
                model,
                pooler.pooling_type,
                max_model_len=max_model_len,
                max_num_seqs=getattr(args, "max_num_seqs", 32),
                max_num_batched_tokens=getattr(args, "max_num_batched_tokens", None),
            )
        except ValueError as e:  # UnsupportedModelError, PoolerConfigError, bad args
            raise ModelLoadError(str(e)) from None
        check_task(getattr(args, "task", "auto"), cfg)
        tokenizer = encoder_tokenizer(getattr(args, "tokenizer", None) or model_dir)
        if tokenizer is None:
            logger.warning("no tokenizer next to %s: only token-id inputs will work", model_dir)
        engine = cls(runner, cfg, pooler, tokenizer, model_name=str(args.model or model_dir))
        logger.info("pooling model %s: %s, pooler %s (normalize=%s, from %s), max_model_len %d",
                    engine.model_name, cfg.architecture, pooler.pooling_type.value,
                    pooler.normalize, pooler.source, max_model_len)
        return engine

    @classmethod
    def _decoder_from_args(cls, args: Any, source: Path) -> PoolingEngine:
        from serving.engine.pooling_decoder import load_decoder_pooling

        task = getattr(args, "task", "auto")
        if task not in ("auto", "embed", "embedding"):
            raise ModelLoadError(f"--task {task}: {source.name} is not a BERT-family "
                                 "encoder; decoder models serve --task embed (or generate)")
        runner, cfg, pooler, tokenizer, name = load_decoder_pooling(
            args, source, dtype=getattr(args, "dtype", "auto"),
            max_model_len=getattr(args, "max_model_len", None))
        engine = cls(runner, cfg, pooler, tokenizer, model_name=name)
        logger.info("decoder embedding model %s: %s, pooler %s (normalize=%s, from %s), "
                    "max_model_len %d", name, cfg.architecture, pooler.pooling_type.value,
                    pooler.normalize, pooler.source, runner.max_model_len)
        return engine

    async def start(self) -> None:
        """Start the engine thread (idempotent). Compiles first if ``warmup()`` was not run."""
        self.start_thread()

    def start_thread(self) -> None:
        """``start`` for callers without an event loop (the offline API, scripts)."""
        if self._thread is not None:
            return
        self.runner.warmup()
        self._thread = threading.Thread(target=self._loop, name="pooling-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Let in-flight requests finish for up to ``drain_timeout`` s, then stop the thread;
        whatever is still pending fails with ``EngineDeadError``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout
        while self._in_flight and loop.time() < deadline and self.is_healthy():
            await asyncio.sleep(0.05)
        await loop.run_in_executor(None, self.close)

    def close(self) -> None:
        """Stop the thread now, without draining; pending requests fail with
        ``EngineDeadError``. For tests and callers without an event loop."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=60.0)
        self._fail_pending(EngineDeadError("the pooling engine was shut down"))

    def is_healthy(self) -> bool:
        return (self._dead is None and not self._stopping and self._thread is not None
                and self._thread.is_alive())

    def check_health(self) -> None:
        """Raise ``EngineDeadError`` if the engine thread is not running."""
        if self._dead is not None:
            raise EngineDeadError(f"the pooling engine died: {self._dead!r}")
        if not self.is_healthy():
            raise EngineDeadError("the pooling engine is not running")

    @property
    def num_in_flight(self) -> int:
        return self._in_flight

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    @property
    def supported_tasks(self) -> tuple[str, ...]:
        return self.info.tasks

    @property
    def labels(self) -> list[str]:
        """Class names of a classifier, by class index ("LABEL_i" where the config has none)."""
        names = dict(self.model_config.id2label)
        return [names.get(i, f"LABEL_{i}") for i in range(self.model_config.num_labels)]

    def stats(self) -> PoolingStats:
        st = self._stats
        st.num_compiles = self.runner.num_compiles
        st.num_recompiles = self.runner.num_recompiles
        st.num_running = self._in_flight
        st.num_waiting = len(self._pending)
        return st

    # ------------------------------------------------------------------------- tokenization

    def tokenize(self, texts: list[str], *, add_special_tokens: bool = True,
                 truncate_prompt_tokens: int | None = None) -> list[PoolingInput]:
        """Tokenize single texts; truncation (when asked) keeps the end, specials intact."""
        kwargs = self._truncation_kwargs(truncate_prompt_tokens)
        enc = self._tok()(texts, add_special_tokens=add_special_tokens, **kwargs)
        return self._inputs(enc, len(texts))

    def tokenize_pairs(self, texts_1: list[str], texts_2: list[str], *,
                       truncate_prompt_tokens: int | None = None) -> list[PoolingInput]:
        """Tokenize (text_1, text_2) pairs for a cross-encoder, with segment ids."""
        if len(texts_1) != len(texts_2):
            raise ValueError("text_1 and text_2 must pair up one to one")
        kwargs = self._truncation_kwargs(truncate_prompt_tokens)
        tok = self._tok()
        # One call per pair, as vLLM and a single transformers call do: an empty text_2 then
        # means "no second segment" ([CLS] a [SEP]), where a batched call would add a [SEP].
        out: list[PoolingInput] = []
        for a, b in zip(texts_1, texts_2, strict=True):
            out.extend(self._inputs({k: [v] for k, v in tok(a, b, **kwargs).items()}, 1))
        return out

    def _tok(self) -> Any:
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer; send token ids")
        return self.tokenizer

    def _truncation_kwargs(self, truncate_prompt_tokens: int | None) -> dict[str, Any]:
        if truncate_prompt_tokens is None:
            return {}
        keep = PoolingParams(truncate_prompt_tokens=truncate_prompt_tokens)
        keep.validate(PoolingModelInfo(tasks=("embed",), hidden_size=1,
                                       max_model_len=self.max_model_len))
        return {"truncation": True, "max_length": keep.truncation_len(self.max_model_len)}

    def _inputs(self, enc: Any, n: int) -> list[PoolingInput]:
        with_types = self.model_config.type_vocab_size > 1 and "token_type_ids" in enc
        return [
            PoolingInput(list(enc["input_ids"][i]),
                         list(enc["token_type_ids"][i]) if with_types else None)
            for i in range(n)
        ]

    # ------------------------------------------------------------------------- requests

    async def embed(self, token_id_lists: list[list[int]],
                    pooling: PoolingParams) -> list[np.ndarray]:
        """Pool each token-id list; returns one array per input (shape per task, see module
        ``pooling_params``)."""
        outs = await self.encode([PoolingInput(list(ids)) for ids in token_id_lists], pooling)
        return [o.data for o in outs]

    async def encode(self, inputs: list[PoolingInput],
                     params: PoolingParams) -> list[PoolingOutput]:
        """Validate, truncate and pool ``inputs``; results in input order.

        Raises ``ValueError`` (a 400) for invalid params or inputs, before anything is queued;
        ``EngineDeadError`` when the engine is not running.
        """
        params.validate(self.info)
        prepared = [self._prepare(x, params) for x in inputs]
        if not prepared:
            return []
        self.check_health()
        loop = asyncio.get_running_loop()
        req = _Request(loop, loop.create_future(), params, [None] * len(prepared), len(prepared))
        kind = _KIND_OF_TASK[params.task]
        with self._cv:
            for i, (ids, types) in enumerate(prepared):
                self._pending.append(_Item(req, i, kind, ids, types, next(self._seq_counter)))
            self._cv.notify()
        self._in_flight += 1
        try:
            return await req.future
        except asyncio.CancelledError:
            req.failed = True  # the thread drops its remaining sequences
            raise
        finally:
            self._in_flight -= 1

    def _prepare(self, x: PoolingInput,
                 params: PoolingParams) -> tuple[list[int], list[int] | None]:
        ids, types = list(x.token_ids), x.token_type_ids
        if not ids:
            raise ValueError("each input must have at least one token")
        if types is not None:
            if len(types) != len(ids):
                raise ValueError("token_type_ids must be as long as the token ids")
            if min(types) < 0 or max(types) >= max(self.model_config.type_vocab_size, 1):
                raise ValueError("token_type_ids out of range for this model")
            types = list(types)
        vocab = self.model_config.vocab_size
        for t in ids:
            if not 0 <= t < vocab:
                raise ValueError(f"Token id {t} is out of vocabulary")
        keep = params.truncation_len(self.max_model_len)
        if keep is not None and len(ids) > keep:
            ids = ids[-keep:]  # vLLM's truncation of token inputs keeps the end
            types = types[-keep:] if types is not None else None
        if len(ids) > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {len(ids)} tokens in the input for {_TASK_WHAT[params.task]}. "
                "Please reduce the length of the input.")
        return ids, types

    def _postprocess(self, params: PoolingParams, raw: np.ndarray) -> np.ndarray:
        if params.task == "embed":
            v = raw[: params.dimensions] if params.dimensions else raw
            norm = self.pooler_config.normalize if params.normalize is None else params.normalize
            return l2_normalize_np(v) if norm else v.astype(np.float32)
        if params.task == "encode":
            return l2_normalize_np(raw) if params.normalize else raw.astype(np.float32)
        if params.activation is False:
            return raw.astype(np.float32)
        act = self._score_act if params.task == "score" else self._classify_act
        return apply_activation(raw, act)

    # ------------------------------------------------------------------------- the thread

    def _take_batch(self) -> list[_Item]:
        """Remove and return the next step's sequences (see the module docstring)."""
        while self._pending and self._pending[0].request.failed:
            self._pending.popleft()
        if not self._pending:
            return []
        oldest = self._pending[0]
        kind = oldest.kind
        t_bucket = self.runner.token_bucket(len(oldest.token_ids))
        cap = self.runner.max_batch(t_bucket, kind)
        chosen: list[_Item] = []
        keep: list[_Item] = []
        for n_seen, item in enumerate(self._pending):
            if n_seen >= SCAN_WINDOW or len(chosen) >= cap:
                keep.append(item)
                continue
            if item.request.failed:
                continue
            if item.kind == kind and len(item.token_ids) <= t_bucket:
                chosen.append(item)
            else:
                keep.append(item)
        if len(chosen) >= SPLIT_MIN_BATCH:
            fit = max(s for s in self.runner.seq_buckets if s <= len(chosen))
            keep = chosen[fit:] + keep
            keep.sort(key=lambda it: it.seq_no)
            chosen = chosen[:fit]
        self._pending = collections.deque(keep)
        return chosen

    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._pending and not self._stopping:
                        self._cv.wait()
                    if self._stopping:
                        return
                    batch = self._take_batch()
                if batch:
                    self._step(batch)
        except BaseException as e:  # the thread must not die silently
            logger.exception("pooling engine thread died")
            self._dead = e
            self._fail_pending(EngineDeadError(f"the pooling engine died: {e!r}"))

    def _step(self, batch: list[_Item]) -> None:
        kind = batch[0].kind
        try:
            raw = self.runner.run(kind, [it.token_ids for it in batch],
                                  [it.token_type_ids for it in batch])
        except Exception as e:  # fail this step's requests, keep serving the others
            logger.exception("pooling step failed")
            for it in batch:
                self._fail(it.request, e)
            return
        shape, padded = self.runner.step_shape(kind, [len(it.token_ids) for it in batch])
        st = self._stats
        st.num_steps += 1
        st.num_sequences += len(batch)
        st.prompt_tokens_total += sum(len(it.token_ids) for it in batch)
        st.num_padded_tokens += padded
        self.step_sizes[shape] += 1
        for it, out in zip(batch, raw, strict=True):
            req = it.request
            if req.failed:
                continue
            try:
                data = self._postprocess(req.params, out)
            except Exception as e:
                self._fail(req, e)
                continue
            req.results[it.index] = PoolingOutput(data, len(it.token_ids))
            req.remaining -= 1
            if req.remaining == 0:
                results = [r for r in req.results if r is not None]
                req.loop.call_soon_threadsafe(_resolve, req.future, results)

    def _fail(self, req: _Request, exc: BaseException) -> None:
        if not req.failed:
            req.failed = True
            req.loop.call_soon_threadsafe(_reject, req.future, exc)

    def _fail_pending(self, exc: BaseException) -> None:
        with self._cv:
            items, self._pending = list(self._pending), collections.deque()
        for it in items:
            self._fail(it.request, exc)


def _resolve(fut: asyncio.Future[list[PoolingOutput]], value: list[PoolingOutput]) -> None:
    if not fut.done():
        fut.set_result(value)


def _reject(fut: asyncio.Future[list[PoolingOutput]], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


# ----------------------------------------------------------------------------- helpers


POOLING_TASKS = ("embed", "embedding", "classify", "score")


def check_task(task: str, cfg: BertConfig) -> None:
    """``--task`` must fit the checkpoint: embed needs an encoder, classify/score a
    sequence-classification head."""
    if task == "auto":
        return
    if task in ("embed", "embedding") and not cfg.is_classifier:
        return
    if task in ("classify", "score") and cfg.is_classifier:
        return
    if task == "generate":
        raise ModelLoadError(f"--task generate: {cfg.architecture} is an encoder; it serves "
                             "embeddings or scores, not text generation")
    if task in ("embed", "embedding"):
        raise ModelLoadError(f"--task {task}: {cfg.architecture} is a cross-encoder; use "
                             "--task score (or auto)")
    if task in ("classify", "score"):
        raise ModelLoadError(f"--task {task}: {cfg.architecture} has no classification head; "
                             "use --task embed (or auto)")
    raise ModelLoadError(f"unknown task {task!r}")


def wants_pooling_engine(args: Any) -> bool:
    """Whether ``serve`` should build a ``PoolingEngine`` for these ``EngineArgs``: a
    BERT-family HF directory (unless ``--task generate``, which it refuses), or ``--task
    embed|embedding`` on any other model (a decoder embedding model). ``--task auto`` on a
    decoder generates; ``--task classify|score`` needs a cross-encoder."""
    task = getattr(args, "task", "auto")
    try:
        path = Path(resolve_source(args.model, getattr(args, "cache_dir", None)))
    except ModelLoadError:
        if task in POOLING_TASKS:
            raise
        return False  # the generation engine reports the problem
    if is_encoder_dir(path):
        if task == "generate":
            check_task(task, read_config(path))
        return True
    if task in ("classify", "score"):
        raise ModelLoadError(f"--task {task} needs a BERT-family cross-encoder "
                             "(…ForSequenceClassification) in a Hugging Face directory; "
                             "decoder models serve --task embed or generate")
    return task in ("embed", "embedding")
