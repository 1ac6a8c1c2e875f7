"""LLMEngine: one engine for generation and pooling; one ``step()`` at a time.

Owns the model runner, the scheduler and the KV-cache manager. Single-threaded by contract: the
async client drives it from its own engine thread, the offline ``LLM`` API from the caller's
thread. ``step`` is schedule -> execute -> update. Requests come in validated
(``serving.engine.input_processor``) and results go out as token ids (``SeqOutput``); text and
stop strings are the output processor's, off this thread.

What the engine serves follows from the model and ``--task``: a decoder generates (``auto`` /
``generate``) or serves embeddings of its final hidden states (``embed``); a BERT-family encoder
serves embeddings or, with a classification head, scores. Either way it is the same loop: a
pooling request is a prompt that finishes when it is computed, with its pooled result.

Faults (docs/RELIABILITY.md, "Faults"): an out-of-memory error in a step (XLA's
``RESOURCE_EXHAUSTED``) fails the requests of that step with finish_reason "error" and frees their
pages; the engine goes on (unless the step had already consumed the donated KV cache: then it is
an engine failure). Any other exception in ``step`` is an engine failure, left to the caller.
``check_idle`` is the leak self-check the async client runs whenever the engine goes idle.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from models.bert import BertConfig, is_encoder_dir, pack_encoder_linears
from models.config import ModelConfig
from models.layers import pack_linears
from models.loader import load_model, resolve_source
from models.pooling import (
    PoolerConfig,
    classify_activation,
    resolve_pooler_config,
    score_activation,
)
from models.registry import LoadedModel, ModelLoadError, resolve_dtype
from models.weights import default_place
from ops.backend import check_kv_cache_dtype, get_attention_fn, get_linear_fn, get_top_k_fn
from serving.engine.compilation import enable_compilation_cache
from serving.engine.config import EngineArgs
from serving.engine.faults import fault_hook_from_env, is_out_of_memory
from serving.engine.input_processor import InputProcessor, ModelFacts
from serving.engine.kv_cache_manager import KVCacheManager
from serving.engine.model_runner import KVLayout, ModelRunner, RunnerConfig, num_pages_for
from serving.engine.output_processor import PoolingPost
from serving.engine.outputs import SeqOutput
from serving.engine.pooling_params import PoolingModelInfo
from serving.engine.records import RunnerOutput, SchedulerOutput
from serving.engine.request import EngineRequest
from serving.engine.scheduler import Scheduler, SchedulerConfig
from serving.engine.sharded import log_layout, make_sharder, shard_loaded
from serving.engine.structured_output import GrammarBackend

log = logging.getLogger("xlaserve.engine")

EMBED_TASKS = ("embed", "encode")
SCORE_TASKS = ("classify", "score")
_NO_DECODER_SCORES = ("--task {task} needs a BERT-family cross-encoder "
                      "(…ForSequenceClassification) in a Hugging Face directory; decoder "
                      "models serve --task embed or generate")


@dataclass(frozen=True)
class EngineStats:
    """The engine's counters: one source for the server's metrics and the benchmarks."""

    num_running: int = 0
    num_waiting: int = 0
    kv_pages_used: int = 0
    kv_pages_total: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_steps: int = 0
    num_recompiles: int = 0  # traces / compiles JAX performed while serving (should stay 0)
    num_executables: int = 0  # built ahead of time at warm-up
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    num_padded_tokens: int = 0  # token slots computed (the T bucket of every step), summed
    num_cached_grammars: int = 0  # compiled grammars (or their errors) in the backend's LRU
    kv_pages_cached: int = 0  # unreferenced pages holding a cached prefix (evictable)
    num_aborted: int = 0  # requests aborted before they finished (disconnects, shutdown)
    num_failed_steps: int = 0  # steps that ran out of memory (their requests failed)
    kv_leaks_detected: int = 0  # idle self-checks where the page counts did not add up


def serving_tasks(task: str, config: ModelConfig | BertConfig) -> tuple[str, ...]:
    """What an engine on a model of ``config`` serves for ``--task`` (raises
    ``ModelLoadError``)."""
    if isinstance(config, BertConfig):
        cfg = config
        mine = SCORE_TASKS if cfg.is_classifier else EMBED_TASKS
        if task == "auto" or (task in ("embed", "embedding") and not cfg.is_classifier) or \
                (task in SCORE_TASKS and cfg.is_classifier):
            return mine
        if task == "generate":
            raise ModelLoadError(f"--task generate: {cfg.architecture} is an encoder; it "
                                 "serves embeddings or scores, not text generation")
        if task in ("embed", "embedding"):
            raise ModelLoadError(f"--task {task}: {cfg.architecture} is a cross-encoder; use "
                                 "--task score (or auto)")
        if task in SCORE_TASKS:
            raise ModelLoadError(f"--task {task}: {cfg.architecture} has no classification "
                                 "head; use --task embed (or auto)")
        raise ModelLoadError(f"unknown task {task!r}")
    if task in ("auto", "generate"):
        return ("generate",)
    if task in ("embed", "embedding"):
        return EMBED_TASKS
    if task in SCORE_TASKS:
        raise ModelLoadError(_NO_DECODER_SCORES.format(task=task))
    raise ModelLoadError(f"unknown task {task!r}")


def check_decoder_embedding_source(path: Path) -> None:
    """Refuse, before any weights are read, HF checkpoints of a family the loader does not know,
    and those the causal decoder path would embed wrongly: bidirectional decoders
    (EmbeddingGemma-style ``use_bidirectional_attention``, ``is_causal: false``) and
    sequence-classification heads."""
    cfg_path = path / "config.json" if path.is_dir() else None
    if cfg_path is None or not cfg_path.exists():
        return
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_path} is not valid JSON: {e}") from None
    try:
        ModelConfig.from_hf(cfg)
    except (ValueError, KeyError) as e:
        raise ModelLoadError(f"--task embed: {path}: {e}") from None
    text = cfg.get("text_config") or cfg
    if text.get("use_bidirectional_attention") or text.get("is_causal") is False:
        raise ModelLoadError(f"{path}: this decoder uses bidirectional attention, which the "
                             "decoder embedding path (causal) does not support")
    arch = (cfg.get("architectures") or [""])[0]
    if arch.endswith("ForSequenceClassification"):
        raise ModelLoadError(f"{path}: {arch} (a classification head on a decoder) is not "
                             "supported; decoder models serve --task embed only")


def _load(args: EngineArgs, place: Any, single_device: bool) -> LoadedModel:
    path = resolve_source(args.model, args.cache_dir)
    if not is_encoder_dir(path):  # refused before any weight is read
        if args.task in SCORE_TASKS:
            raise ModelLoadError(_NO_DECODER_SCORES.format(task=args.task))
        if args.task in ("embed", "embedding"):
            check_decoder_embedding_source(path)
    backend = args.attention_backend
    if not single_device and jax.default_backend() == "cpu":
        if backend == "native":
            raise ModelLoadError("--attention-backend native runs on one device; use "
                                 "'reference' with tensor or data parallelism")
        if backend == "auto":
            backend = "reference"  # the native kernels are single-device (no sharded layout)
    if args.kv_cache_dtype != "auto":  # refused before any weight is read
        try:
            check_kv_cache_dtype(backend, resolve_dtype(args.kv_cache_dtype),
                                 resolve_dtype(args.dtype))
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
    attn_fn, write_fn, _ = get_attention_fn(backend)
    loaded = load_model(args.model, dtype=args.dtype, attn_fn=attn_fn, write_fn=write_fn,
                        cache_dir=args.cache_dir, tokenizer_path=args.tokenizer, place=place)
    # Encoders pack f32 whatever --cpu-weight-dtype says: their prefill GEMMs are compute-bound
    # (f16 halves no time there, its conversion costs some) and f16 weights moved MiniLM's
    # embeddings 1.2e-4 and the tiny cross-encoder's logits 8e-3 off transformers' goldens.
    weight_dtype = "f32" if loaded.is_encoder else args.cpu_weight_dtype
    linear = get_linear_fn(backend, weight_dtype)
    if linear is not None:
        if loaded.dtype is None or jnp.dtype(loaded.dtype) != jnp.float32:
            log.info("native CPU GEMM skipped: it takes float32 activations, the model runs "
                     "%s", loaded.dtype)
        else:
            pack = pack_encoder_linears if loaded.is_encoder else pack_linears
            n = pack(loaded.model, linear)
            log.info("packed %d modules' weights for the %s", n, linear.description)
    return loaded


class LLMEngine:
    def __init__(self, args: EngineArgs, loaded: LoadedModel | None = None,
                 sharder: Any = None, warmup: bool = True) -> None:
        self.args = args
        # Checked first: a stray $XLASERVE_TEST_FAULT refuses to start before anything loads.
        try:
            self.faults = fault_hook_from_env(args.enable_test_hooks)
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
        if args.compilation_cache:
            enable_compilation_cache(args.cache_dir)
        if sharder is None:
            sharder = make_sharder(args, loaded)  # None: one device (tp = dp = 1)
        if loaded is None:
            loaded = _load(args, default_place if sharder is None else sharder.place,
                           single_device=sharder is None)
        self.tasks = serving_tasks(args.task, loaded.config)
        if sharder is not None:
            loaded = shard_loaded(loaded, sharder)
        self.sharder = sharder
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        cfg = loaded.config
        encoder = loaded.is_encoder
        generates = "generate" in self.tasks
        limit = cfg.max_input_len if isinstance(cfg, BertConfig) else cfg.max_position_embeddings
        self.max_model_len = int(args.max_model_len or loaded.max_model_len)
        if self.max_model_len > limit:
            if encoder:
                raise ModelLoadError(f"max_model_len {self.max_model_len} exceeds the model's "
                                     f"{limit} positions")
            log.warning("max_model_len %d exceeds the model's %d positions",
                        self.max_model_len, limit)
        on_cpu = jax.default_backend() == "cpu"
        if args.max_num_batched_tokens:
            mnbt = args.max_num_batched_tokens
        elif generates:
            mnbt = max(args.max_num_seqs, 256 if on_cpu else 2048)
        else:  # pooling prompts run whole (encoders) or in long chunks: a large budget
            mnbt = max(args.max_num_seqs, self.max_model_len,
                       min(8192, args.max_num_seqs * self.max_model_len))
        self.sched_cfg = SchedulerConfig(args.max_num_seqs, mnbt, self.max_model_len,
                                         chunked_prefill=not encoder)
        kv_layout = None
        num_pages = 0
        if not encoder:
            assert isinstance(cfg, ModelConfig)
            kv_dtype = resolve_dtype(args.dtype) if loaded.dtype is None else loaded.dtype
            if args.kv_cache_dtype != "auto":
                kv_dtype = resolve_dtype(args.kv_cache_dtype)
            kv_layout = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, kv_dtype)
            num_pages = num_pages_for(
                kv_layout, args.block_size, max_num_seqs=args.max_num_seqs,
                max_model_len=self.max_model_len, num_kv_pages=args.num_kv_pages,
                kv_cache_gb=args.kv_cache_gb, memory_fraction=args.kv_cache_memory_fraction,
                kv_shards=1 if sharder is None else sharder.kv_shards(cfg.num_kv_heads),
                devices=None if sharder is None else sharder.local_devices)
            if sharder is not None:  # all processes of a multi-host mesh allocate the same pool
                num_pages = sharder.agree_min("kv_pages", num_pages)
        self.runner = ModelRunner(
            loaded.model,
            RunnerConfig(args.block_size, num_pages, args.max_num_seqs, mnbt, self.max_model_len,
                         generates=generates, pools=not generates,
                         # pooling prompts are rarely a handful of tokens: no tiny buckets
                         min_token_bucket=1 if generates else 16,
                         buckets=args.token_buckets,
                         # the native kernels are single-device, as in _load
                         sampler_top_k=None if sharder is not None or not generates
                         else get_top_k_fn(args.attention_backend)),
            kv_layout, sharder)
        self.kv = KVCacheManager(num_pages, args.block_size, args.enable_prefix_caching)
        # Structured outputs: one llguidance tokenizer per engine, built now (0.2-2.5 s), off
        # every request's path; masks as wide as the logits, every EOS id allowed at the end.
        self.grammars: GrammarBackend | None = None
        if generates and self.tokenizer is not None and hasattr(self.tokenizer,
                                                                "backend_tokenizer"):
            self.grammars = GrammarBackend.from_hf_tokenizer(
                self.tokenizer, self._eos_ids(), cfg.vocab_size)
        self.scheduler = Scheduler(self.sched_cfg, self.kv, self.grammars)
        weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(self.runner.state))
        log.info("KV cache: %d pages x %d tokens = %d tokens, %s, %.1f MiB (weights %.1f MiB)",
                 num_pages, args.block_size, self.kv.num_usable * args.block_size,
                 "none" if kv_layout is None else jnp.dtype(kv_layout.dtype).name,
                 self.runner.kv_bytes / 2**20, weight_bytes / 2**20)
        if sharder is not None and kv_layout is not None:
            log_layout(sharder, loaded.model, self.runner.kv, num_pages, args.block_size)
        self.pooler: PoolerConfig | None = None
        pooling_info = None
        if not generates:
            if self.tokenizer is not None:  # truncation keeps a prompt's end, as vLLM does
                self.tokenizer.truncation_side = "left"
            self.pooler = resolve_pooler_config(
                Path(loaded.source) if Path(loaded.source).is_dir() else None,
                is_decoder=not encoder, override=args.override_pooler_config)
            pooling_info = PoolingModelInfo(
                tasks=self.tasks, hidden_size=cfg.hidden_size, max_model_len=self.max_model_len,
                num_labels=getattr(cfg, "num_labels", 0),
                is_matryoshka=getattr(cfg, "is_matryoshka", False),
                matryoshka_dimensions=getattr(cfg, "matryoshka_dimensions", None))
        self.facts = ModelFacts(
            vocab_size=cfg.vocab_size, max_model_len=self.max_model_len,
            page_size=args.block_size, usable_pages=self.kv.num_usable,
            eos_ids=self._eos_ids() if generates else frozenset(), tasks=self.tasks,
            pooling=pooling_info,
            pooling_type=None if self.pooler is None else self.pooler.pooling_type,
            type_vocab_size=getattr(cfg, "type_vocab_size", 0), has_kv_cache=not encoder,
            max_tokens_cap=self.generation_defaults().get("max_tokens"))
        self.compile_seconds = self.runner.warmup() if warmup else 0.0
        if warmup and self.grammars is not None and \
                self.grammars.mask_width != self.runner.mask_width:
            raise ModelLoadError(f"grammar masks are {self.grammars.mask_width} words wide but "
                                 f"the logits need {self.runner.mask_width}")
        self._prompt_tokens = 0
        self.num_failed_steps = 0
        self.num_kv_leaks = 0

    def _eos_ids(self) -> frozenset[int]:
        cfg = self.loaded.config
        assert isinstance(cfg, ModelConfig)
        eos = set(cfg.eos_token_ids)
        v = self.loaded.generation_config.get("eos_token_id")
        eos |= set(v) if isinstance(v, list) else ({v} if v is not None else set())
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            eos.add(int(self.tokenizer.eos_token_id))
        return frozenset(int(e) for e in eos)

    # ---- what callers build around the engine ------------------------------------------------
    @property
    def model_config(self) -> Any:
        return self.loaded.config

    def input_processor(self) -> InputProcessor:
        """A validator for this engine's requests, for the caller's thread."""
        return InputProcessor(self.facts, self.tokenizer, self.args.seed, self.grammars)

    def pooling_post(self) -> PoolingPost | None:
        if self.pooler is None:
            return None
        cfg = self.loaded.config
        labels = getattr(cfg, "num_labels", 0)
        problem = getattr(cfg, "problem_type", None)
        return PoolingPost(self.pooler, classify_activation(labels, problem),
                           score_activation(labels, problem,
                                            getattr(cfg, "cross_encoder_activation", None)))

    def generation_defaults(self) -> dict[str, Any]:
        if self.args.generation_config == "vllm" or "generate" not in self.tasks:
            return {}
        from models.loader import generation_defaults
        gen = self.loaded.generation_config
        if self.args.generation_config not in ("auto", ""):
            path = os.path.join(self.args.generation_config, "generation_config.json")
            with open(path) as f:
                gen = json.load(f)
        return generation_defaults(gen)

    # ---- requests ----------------------------------------------------------------------------
    def add_request(self, spec: EngineRequest) -> None:
        self.scheduler.add(spec)
        self._prompt_tokens += spec.prompt_len

    def abort(self, request_id: str) -> list[SeqOutput]:
        return self.scheduler.abort(request_id)

    def finish_sequence(self, request_id: str, index: int) -> None:
        """Release a choice the output processor ended (a stop string)."""
        req = self.scheduler.requests.get(request_id)
        if req is not None:
            self.scheduler.finish_sequence(req.seqs[index])

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> list[SeqOutput]:
        sched = self.scheduler.schedule()
        try:
            result = self._execute(sched)
        except Exception as e:
            if not is_out_of_memory(e) or not self.runner.kv_intact():
                raise
            log.error("Engine step ran out of memory; failing its %d requests: %s",
                      len({r.seq_id for r in sched.rows}), e)
            self.num_failed_steps += 1
            return self.scheduler.fail_step(sched)
        return self.scheduler.update_from_output(sched, result)

    def _execute(self, sched: SchedulerOutput) -> RunnerOutput:
        if self.faults is not None and not sched.empty:
            self.faults.before_execute()
        return self.runner.execute(sched, self.scheduler.fill_masks)

    def check_idle(self) -> str | None:
        """The leak self-check, for when no request is live: ``free + cached + held == total``
        pages (``KVCacheManager.audit``). A mismatch is logged ("KV leak") and counted in
        ``kv_leaks_detected``; returns it, or None."""
        problem = self.kv.audit(self.scheduler.num_pages_held)
        if problem is not None:
            self.num_kv_leaks += 1
            log.error("KV leak: %s", problem)
        return problem

    def get_stats(self) -> EngineStats:
        s, r = self.scheduler, self.runner
        return EngineStats(
            num_running=len(s.running), num_waiting=len(s.waiting),
            kv_pages_used=self.kv.num_used, kv_pages_total=self.kv.num_usable,
            num_preemptions=s.num_preemptions, prefix_cache_queries=self.kv.prefix_queries,
            prefix_cache_hits=self.kv.prefix_hits, num_steps=r.num_steps,
            num_recompiles=r.num_recompiles, num_executables=r.num_executables,
            prompt_tokens_total=self._prompt_tokens,
            generation_tokens_total=s.num_generated, num_padded_tokens=r.num_padded_tokens,
            num_cached_grammars=0 if self.grammars is None else self.grammars.cache_size,
            kv_pages_cached=self.kv.num_cached, num_aborted=s.num_aborted,
            num_failed_steps=self.num_failed_steps, kv_leaks_detected=self.num_kv_leaks)


def maybe_run_follower(args: EngineArgs, load: Any = None) -> bool:
    """Multi-host entry for the ``serve`` CLI, called before anything else touches JAX.

    Starts ``jax.distributed`` when ``args`` (or JAX's environment variables) ask for several
    processes. On process 0 it then returns False and the caller serves HTTP as usual (its engine
    becomes the lockstep leader). On any other process it builds the same engine and replays the
    leader's steps until the leader stops, then returns True: the caller should exit.
    ``load`` builds the model instead of ``args.model`` (tests: an in-memory model).
    """
    from sharding.distributed import initialize
    multi = initialize(args.distributed_coordinator, args.num_processes, args.process_id)
    if not multi or jax.process_index() == 0:
        return False
    engine = LLMEngine(args, loaded=None if load is None else load(), warmup=True)
    engine.runner.follow()
    return True
