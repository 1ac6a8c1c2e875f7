"""LLMEngine: owns the model runner, scheduler and KV manager; one ``step()`` at a time.

Single-threaded by contract: the async client drives it from its own engine thread, the offline
``LLM`` API from the caller's thread. ``step`` is schedule → execute → update.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any

import jax

from models.loader import load_model
from models.registry import LoadedModel, resolve_dtype
from models.weights import default_place
from ops.backend import get_attention_fn
from serving.engine.config import EngineArgs
from serving.engine.detokenizer import IncrementalDetokenizer
from serving.engine.kv_cache_manager import KVCacheManager
from serving.engine.model_runner import ModelRunner, RunnerConfig, RunnerOutput, num_pages_for
from serving.engine.outputs import CompletionDelta, RequestOutput, TokenLogprob
from serving.engine.request import Request, SeqStatus, Sequence
from serving.engine.sampling_params import SamplingParams
from serving.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from serving.engine.sharded import log_layout, make_sharder, shard_loaded

log = logging.getLogger("xlaserve.engine")


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_pages_used: int = 0
    kv_pages_total: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_steps: int = 0
    num_recompiles: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0


def enable_compilation_cache(cache_root: str | None) -> str:
    from models.assets import cache_dir
    path = os.path.join(str(cache_dir(cache_root)), "jax_compilation_cache")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


class LLMEngine:
    def __init__(self, args: EngineArgs, loaded: LoadedModel | None = None,
                 sharder: Any = None, warmup: bool = True) -> None:
        self.args = args
        if args.compilation_cache:
            enable_compilation_cache(args.cache_dir)
        if sharder is None:
            sharder = make_sharder(args, loaded)  # None: one device (tp = dp = 1)
        if loaded is None:
            attn_fn, write_fn, _ = get_attention_fn(args.attention_backend)
            loaded = load_model(args.model, dtype=args.dtype, attn_fn=attn_fn, write_fn=write_fn,
                                cache_dir=args.cache_dir, tokenizer_path=args.tokenizer,
                                place=default_place if sharder is None else sharder.place)
        if sharder is not None:
            loaded = shard_loaded(loaded, sharder)
        self.sharder = sharder
        self.loaded = loaded
        cfg = loaded.config
        self.model_config = cfg
        self.tokenizer = loaded.tokenizer
        self.max_model_len = int(args.max_model_len or cfg.max_position_embeddings)
        if self.max_model_len > cfg.max_position_embeddings:
            log.warning("max_model_len %d exceeds the model's %d positions",
                        self.max_model_len, cfg.max_position_embeddings)
        on_cpu = jax.default_backend() == "cpu"
        mnbt = args.max_num_batched_tokens or max(args.max_num_seqs, 256 if on_cpu else 2048)
        kv_dtype = resolve_dtype(args.dtype) if loaded.dtype is None else loaded.dtype
        weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(loaded.model))
        num_pages = num_pages_for(
            cfg, args.block_size, kv_dtype, max_num_seqs=args.max_num_seqs,
            max_model_len=self.max_model_len, num_kv_pages=args.num_kv_pages,
            kv_cache_gb=args.kv_cache_gb, memory_fraction=args.kv_cache_memory_fraction,
            weight_bytes=weight_bytes,
            kv_shards=1 if sharder is None else sharder.kv_shards(cfg.num_kv_heads),
            devices=None if sharder is None else sharder.local_devices)
        if sharder is not None:  # all processes of a multi-host mesh allocate the same pool
            num_pages = sharder.agree_min("kv_pages", num_pages)
        self.sched_cfg = SchedulerConfig(args.max_num_seqs, mnbt, self.max_model_len)
        self.runner = ModelRunner(
            loaded.model, cfg,
            RunnerConfig(args.block_size, num_pages, args.max_num_seqs, mnbt, self.max_model_len),
            kv_dtype, sharder)
        self.kv = KVCacheManager(num_pages, args.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(self.sched_cfg, self.kv)
        log.info("KV cache: %d pages x %d tokens = %d tokens, %.1f MiB (weights %.1f MiB)",
                 num_pages, args.block_size, (num_pages - 1) * args.block_size,
                 self.runner.kv_bytes / 2**20, weight_bytes / 2**20)
        if sharder is not None:
            log_layout(sharder, loaded.model, self.runner.kv, num_pages, args.block_size)
        self.compile_seconds = self.runner.warmup() if warmup else 0.0
        self.requests: dict[str, Request] = {}
        self._rng = random.Random(args.seed)
        self.stats = EngineStats(kv_pages_total=num_pages - 1)
        gen = loaded.generation_config
        eos = set(cfg.eos_token_ids)
        for key in ("eos_token_id",):
            v = gen.get(key)
            eos |= set(v) if isinstance(v, list) else ({v} if v is not None else set())
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            eos.add(int(self.tokenizer.eos_token_id))
        self.eos_ids = frozenset(int(e) for e in eos)

    # ---- requests ----------------------------------------------------------------------------
    def generation_defaults(self) -> dict[str, Any]:
        if self.args.generation_config == "vllm":
            return {}
        from models.loader import generation_defaults
        gen = self.loaded.generation_config
        if self.args.generation_config not in ("auto", ""):
            import json
            path = os.path.join(self.args.generation_config, "generation_config.json")
            with open(path) as f:
                gen = json.load(f)
        return generation_defaults(gen)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> list[int]:
        """Check a request before it is queued; returns the (possibly truncated) prompt."""
        params.validate(self.model_config.vocab_size)
        if params.truncate_prompt_tokens is not None:
            if params.truncate_prompt_tokens > self.max_model_len:
                raise ValueError(
                    f"truncate_prompt_tokens ({params.truncate_prompt_tokens}) cannot be greater "
                    f"than max_model_len ({self.max_model_len}).")
            prompt_ids = prompt_ids[-params.truncate_prompt_tokens:]
        if not prompt_ids:
            raise ValueError("The prompt cannot be empty.")
        v = self.model_config.vocab_size
        if any(not 0 <= t < v for t in prompt_ids):
            raise ValueError(f"Token id out of vocabulary (size {v}) in prompt.")
        n = len(prompt_ids)
        want = params.max_tokens or 0
        if n + want > self.max_model_len or n >= self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {n + want} tokens ({n} in the prompt, {want} for the "
                f"completion). Please reduce the prompt or max_tokens.")
        total = n + (params.max_tokens or self.max_model_len - n)
        if self.kv.pages_for(total) > self.kv.num_pages - 1:
            raise ValueError(
                f"The request needs {self.kv.pages_for(total)} KV pages but the cache holds "
                f"{self.kv.num_pages - 1}; reduce max_tokens or the prompt.")
        return prompt_ids

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        prompt_ids = self.validate(list(prompt_ids), params)
        seed = params.seed if params.seed is not None else self._rng.getrandbits(32)
        max_tokens = params.max_tokens or (self.max_model_len - len(prompt_ids))
        req = Request(request_id, prompt_ids, params, int(seed) & 0xFFFFFFFF, time.time(),
                      self.eos_ids, max_tokens)
        for i in range(params.n):
            seq = Sequence(req, i, list(prompt_ids))
            seq.detok = IncrementalDetokenizer(
                self.tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens,
                spaces_between_special_tokens=params.spaces_between_special_tokens,
                stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output)
            req.seqs.append(seq)
            self.scheduler.add(seq)
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None] * len(prompt_ids)
        self.requests[request_id] = req
        self.stats.prompt_tokens_total += len(prompt_ids)

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        deltas = []
        for seq in req.seqs:
            if seq.status != SeqStatus.FINISHED:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"
                deltas.append(CompletionDelta(seq.index, [], "", None, "abort", None,
                                              seq.num_output))
        return RequestOutput(req.request_id, req.prompt_ids, deltas, finished=True)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        result = self.runner.execute(sched) if not sched.empty else RunnerOutput()
        return self._update(sched, result)

    def _update(self, sched: SchedulerOutput, result: RunnerOutput) -> list[RequestOutput]:
        self.stats.num_steps += 1
        by_req: dict[str, RequestOutput] = {}
        for c in sched.chunks:
            seq, req = c.seq, c.seq.request
            seq.num_computed += c.num_tokens
            self.kv.commit(seq)
            if req.prompt_logprobs is not None and seq.index == 0:
                for pos, (lp, rank, ids, lps) in result.prompt_logprobs.get(
                        seq.seq_id, {}).items():
                    k = req.params.prompt_logprobs or 0
                    req.prompt_logprobs[pos] = TokenLogprob(
                        seq.tokens[pos], lp, rank,
                        [(int(i), float(x)) for i, x in zip(ids[:k], lps[:k], strict=True)])
            if not c.sample:
                continue
            r = result.sampled[seq.seq_id]
            delta = self._append(seq, r)
            out = by_req.get(req.request_id)
            if out is None:
                out = by_req[req.request_id] = RequestOutput(
                    req.request_id, req.prompt_ids, [], num_cached_tokens=seq.num_cached_tokens)
                if req.prompt_logprobs is not None and not req.prompt_logprobs_sent:
                    out.prompt_logprobs = list(req.prompt_logprobs)
                    req.prompt_logprobs_sent = True
            out.outputs.append(delta)
        for out in by_req.values():
            req = self.requests[out.request_id]
            out.finished = req.finished
            if out.finished:
                del self.requests[out.request_id]
        self.stats.num_preemptions = self.scheduler.num_preemptions
        return list(by_req.values())

    def _append(self, seq: Sequence, r: Any) -> CompletionDelta:
        p = seq.params
        tok = r.token
        seq.tokens.append(tok)
        self.stats.generation_tokens_total += 1
        lp = None
        if p.logprobs is not None:
            lp = [TokenLogprob(tok, r.logprob, r.rank, [
                (int(i), float(x)) for i, x in zip(r.top_ids[:p.logprobs],
                                                   r.top_logprobs[:p.logprobs], strict=True)])]
        finish: str | None = None
        stop_reason: int | str | None = None
        text_from = len(seq.detok.text)
        if tok in p.stop_token_ids:
            finish, stop_reason = "stop", tok
            if p.include_stop_str_in_output:
                seq.detok.add(tok)
        elif not p.ignore_eos and tok in seq.request.eos_ids:
            finish = "stop"
        else:
            seq.detok.add(tok)
            if (s := seq.detok.check_stop(text_from)) is not None:
                finish, stop_reason = "stop", s
        if finish is None and (seq.num_output >= seq.request.max_tokens
                               or len(seq.tokens) >= self.max_model_len):
            finish = "length"
            seq.detok.flush()
        text = seq.detok.take(final=finish is not None)
        if finish is not None:
            seq.finish_reason, seq.stop_reason = finish, stop_reason
            self.scheduler.finish(seq)
        return CompletionDelta(seq.index, [tok], text, lp, finish, stop_reason, seq.num_output)

    def get_stats(self) -> EngineStats:
        st = self.stats
        st.num_running = len(self.scheduler.running)
        st.num_waiting = len(self.scheduler.waiting)
        st.kv_pages_used = self.kv.num_used
        st.prefix_cache_queries = self.kv.prefix_queries
        st.prefix_cache_hits = self.kv.prefix_hits
        st.num_recompiles = self.runner.num_recompiles
        return EngineStats(**vars(st))
