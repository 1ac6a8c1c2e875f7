"""Model runner: SchedulerOutput → padded device inputs → one compiled step → RunnerOutput.

Owns the parameters, the KV cache (explicit state: passed into the step, returned, donated) and
the compiled step variants. Shapes are padded to a short bucket list so that every variant is
compiled once at start-up (``warmup``) and the serving loop never compiles: T (tokens) is a
power of two from ``min_token_bucket`` to ``max_num_batched_tokens`` (from 1: on XLA:CPU an
8-row step costs about twice a 1-row one, so a lone sequence must not be padded to 8), S is
min(T, max_num_seqs), and W (page-table width) is fixed by max_model_len. Context length is not a
compiled dimension: the attention loops over as many KV blocks as the longest sequence needs.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from models.config import ModelConfig
from models.inputs import KVCache, StepInputs, pack_step_inputs
from serving.engine.sampler import SamplerOutput, SamplingInputs, prompt_logprobs, sample
from serving.engine.sampling_params import MAX_LOGIT_BIAS, MAX_LOGPROBS
from serving.engine.scheduler import SchedulerOutput

log = logging.getLogger("xlaserve.runner")

BIAS_WIDTH = MAX_LOGIT_BIAS + 32  # logit_bias entries plus min_tokens bans (eos, stop ids)


@dataclass(frozen=True)
class RunnerConfig:
    page_size: int
    num_pages: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    min_token_bucket: int = 1

    @property
    def table_width(self) -> int:  # W
        return -(-self.max_model_len // self.page_size)

    @property
    def token_buckets(self) -> list[int]:
        out, b = [], self.min_token_bucket
        while b < self.max_num_batched_tokens:
            out.append(b)
            b *= 2
        return [*out, self.max_num_batched_tokens]


@dataclass
class SeqResult:
    token: int
    logprob: float
    rank: int
    top_ids: np.ndarray  # i32[MAX_LOGPROBS]
    top_logprobs: np.ndarray  # f32[MAX_LOGPROBS]


@dataclass
class RunnerOutput:
    sampled: dict[str, SeqResult] = field(default_factory=dict)  # seq_id → result
    # seq_id → {position: (logprob, rank, top_ids, top_lps)} for prompt positions
    prompt_logprobs: dict[str, dict[int, tuple[float, int, np.ndarray, np.ndarray]]] = field(
        default_factory=dict)


def kv_bytes_per_page(cfg: ModelConfig, page_size: int, dtype: Any) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * page_size * cfg.head_dim * \
        jnp.dtype(dtype).itemsize


class ModelRunner:
    def __init__(self, model: nnx.Module, model_cfg: ModelConfig, cfg: RunnerConfig,
                 kv_dtype: Any, sharder: Any = None) -> None:
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.graphdef, state = nnx.split(model)
        # Plain nested dicts of arrays: jit flattens these in C++, while nnx Variables flatten in
        # Python on every call (~10 ms per step for a 30-layer model).
        self._state_template = state
        self.state = nnx.to_pure_dict(state)
        self.sharder = sharder  # sharding.Sharder or None (single device)
        shape = (model_cfg.num_kv_heads, cfg.num_pages, cfg.page_size, model_cfg.head_dim)
        make = (lambda: jnp.zeros(shape, kv_dtype)) if sharder is None else \
            (lambda: sharder.zeros_kv(shape, kv_dtype))
        self.kv: KVCache = [(make(), make()) for _ in range(model_cfg.num_layers)]
        self.kv_bytes = kv_bytes_per_page(model_cfg, cfg.page_size, kv_dtype) * cfg.num_pages
        self._step = jax.jit(self._step_fn, donate_argnums=(1,))
        self._sample = jax.jit(sample)
        # All-greedy steps with nothing to adjust skip the sampler (and its lax.conds, which
        # copy the [S, V] logits on XLA:CPU): an argmax is all they need.
        self._argmax = jax.jit(lambda lg: jnp.argmax(lg, axis=-1).astype(jnp.int32))
        self._prompt_lp = jax.jit(self._prompt_lp_fn)
        self.compiled: set[tuple[str, int]] = set()
        self.warm = False
        self.num_recompiles = 0
        self.compile_seconds: dict[tuple[str, int], float] = {}
        v = model_cfg.vocab_size
        self._dummy: dict[tuple[str, int], jax.Array] = {}
        self.vocab_size = v

    # ---- the compiled functions --------------------------------------------------------------
    # Three jitted functions rather than one: the model step varies with T only, the sampler
    # with S only, and prompt logprobs are rare, so compile time grows with the sum of the
    # bucket counts instead of their product.
    def _model(self, pure: dict[str, Any]) -> Any:
        state = jax.tree_util.tree_map(lambda x: x, self._state_template)
        nnx.replace_by_pure_dict(state, pure)
        return nnx.merge(self.graphdef, state)

    def _step_fn(self, state: dict[str, Any], kv: KVCache, inp: StepInputs
                 ) -> tuple[KVCache, jax.Array, jax.Array]:
        model = self._model(state)
        h, kv = model(kv, inp)  # [T, D]
        logits = model.logits(h[inp.logits_indices])  # f32[S, V]
        if self.sharder is not None:  # whole vocab rows: the sampler is the same on any mesh
            logits = self.sharder.gather_logits(logits)
        return kv, logits, h  # f32[S, V], [T, D]

    def _prompt_lp_fn(self, state: dict[str, Any], h: jax.Array, next_ids: jax.Array
                      ) -> tuple[jax.Array, ...]:
        model = self._model(state)
        return prompt_logprobs(model.logits(h), next_ids)

    # ---- host side ---------------------------------------------------------------------------
    def bucket(self, num_tokens: int) -> int:
        for b in self.cfg.token_buckets:
            if num_tokens <= b:
                return b
        raise ValueError(f"{num_tokens} tokens exceed max_num_batched_tokens")

    def num_seq_rows(self, t: int) -> int:
        return min(t, self.cfg.max_num_seqs)

    def _const(self, name: str, rows: int, make: Any) -> jax.Array:
        key = (name, rows)
        if key not in self._dummy:
            self._dummy[key] = self._put(make())
        return self._dummy[key]

    def _put(self, x: Any) -> Any:
        return jax.device_put(x) if self.sharder is None else self.sharder.put_replicated(x)

    def warmup(self) -> float:
        """Compile every variant (progress bar; each compile time logged). Returns seconds."""
        t_all = time.perf_counter()
        for t in tqdm(self.cfg.token_buckets, desc="compiling step buckets", unit="bucket"):
            t0 = time.perf_counter()
            self._run_padded(self._empty_batch(t), want_plp=True)
            self._run_padded(self._empty_batch(t), want_plp=False, greedy_only=True)
            dt = time.perf_counter() - t0
            self.compile_seconds[("step", t)] = dt
            log.info("compiled bucket T=%d S=%d (step, sampler, prompt logprobs) in %.2fs", t,
                     self.num_seq_rows(t), dt)
        self.warm = True
        return time.perf_counter() - t_all

    def step_hlo(self, t: int) -> str:
        """The optimized HLO of the model step for token bucket ``t`` (tools and tests: the
        per-op profile, the in-place KV-cache check)."""
        inp, _, _ = self._empty_batch(t)
        return self._step.lower(self.state, self.kv, inp).compile().as_text() or ""

    def _empty_batch(self, t: int) -> tuple[StepInputs, SamplingInputs, np.ndarray]:
        s, w = self.num_seq_rows(t), self.cfg.table_width
        inp = StepInputs(
            token_ids=np.zeros(t, np.int32), positions=np.zeros(t, np.int32),
            slot_mapping=np.full(t, -1, np.int32), page_table=np.zeros((s, w), np.int32),
            kv_lens=np.zeros(s, np.int32), cu_q_lens=np.zeros(s + 1, np.int32),
            logits_indices=np.zeros(s, np.int32))
        si = self._sampling_arrays(s, [], flags=np.ones(5, bool))
        return inp, si, np.full(t, -1, np.int32)

    def _sampling_arrays(self, s: int, rows: list[Any], flags: np.ndarray) -> SamplingInputs:
        temp = np.zeros(s, np.float32)
        top_k = np.zeros(s, np.int32)
        top_p = np.ones(s, np.float32)
        min_p = np.zeros(s, np.float32)
        pres = np.zeros(s, np.float32)
        freq = np.zeros(s, np.float32)
        rep = np.ones(s, np.float32)
        seeds = np.zeros(s, np.uint32)
        counters = np.zeros(s, np.int32)
        prompt_lens = np.zeros(s, np.int32)
        any_bias = any_pen = False
        for i, seq in enumerate(rows):
            p = seq.params
            temp[i], top_k[i], top_p[i], min_p[i] = p.temperature, p.top_k, p.top_p, p.min_p
            pres[i], freq[i], rep[i] = (p.presence_penalty, p.frequency_penalty,
                                        p.repetition_penalty)
            seeds[i] = (seq.request.seed + 1_000_003 * seq.index) & 0xFFFFFFFF
            counters[i] = seq.num_output
            prompt_lens[i] = seq.prompt_len
            any_pen |= p.uses_penalties
            any_bias |= bool(p.logit_bias) or self._bans(seq) is not None
        if any_bias:
            bias_ids = np.full((s, BIAS_WIDTH), -1, np.int32)
            bias_vals = np.zeros((s, BIAS_WIDTH), np.float32)
            for i, seq in enumerate(rows):
                entries = list(seq.params.logit_bias.items())
                if (bans := self._bans(seq)) is not None:
                    entries += [(b, -np.inf) for b in bans]
                entries = entries[:BIAS_WIDTH]
                if entries:
                    bias_ids[i, :len(entries)] = [int(e[0]) for e in entries]
                    bias_vals[i, :len(entries)] = [float(e[1]) for e in entries]
            b_ids, b_vals = self._put(bias_ids), self._put(bias_vals)
        else:
            b_ids = self._const("bias_ids", s, lambda: np.full((s, BIAS_WIDTH), -1, np.int32))
            b_vals = self._const("bias_vals", s, lambda: np.zeros((s, BIAS_WIDTH), np.float32))
        hw = self.cfg.max_model_len
        if any_pen:
            hist = np.full((s, hw), -1, np.int32)
            for i, seq in enumerate(rows):
                if seq.params.uses_penalties:
                    hist[i, :len(seq.tokens)] = seq.tokens[:hw]
            history = self._put(hist)
        else:
            history = self._const("history", s, lambda: np.full((s, hw), -1, np.int32))
        flags = flags.copy()
        flags[2], flags[3] = flags[2] or any_pen, flags[3] or any_bias
        return SamplingInputs(
            temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, presence=pres,
            frequency=freq, repetition=rep, seeds=seeds, counters=counters, bias_ids=b_ids,
            bias_vals=b_vals, history=history, prompt_lens=prompt_lens, flags=flags)

    @staticmethod
    def _bans(seq: Any) -> list[int] | None:
        """Token ids banned while the sequence is below min_tokens (eos and stop ids)."""
        p = seq.params
        if seq.num_output >= p.min_tokens:
            return None
        bans = set(p.stop_token_ids)
        if not p.ignore_eos:
            bans |= seq.request.eos_ids
        return sorted(bans) or None

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        chunks = sched.chunks
        n_tok = sched.num_tokens
        t = self.bucket(n_tok)
        s, w, ps = self.num_seq_rows(t), self.cfg.table_width, self.cfg.page_size
        inp = pack_step_inputs([(c.seq.tokens[c.start:c.start + c.num_tokens], c.start,
                                 c.seq.pages) for c in chunks], t, s, w, ps)
        plp_next = np.full(t, -1, np.int32)
        want_plp = False
        rows = []
        flags = np.zeros(5, bool)
        for c, off in zip(chunks, inp.cu_q_lens, strict=False):
            seq, n, p = c.seq, c.num_tokens, c.seq.params
            if p.prompt_logprobs is not None and c.start < seq.prompt_len - 1:
                want_plp = True
                nxt = np.arange(c.start + 1, c.start + n + 1)
                ok = nxt < seq.prompt_len
                plp_next[off:off + n] = np.where(ok, np.asarray(seq.tokens)[
                    np.minimum(nxt, len(seq.tokens) - 1)], -1)
            if c.sample:
                flags[0] |= not p.greedy
                flags[1] |= (not p.greedy) and (p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0)
                flags[4] |= p.logprobs is not None
            rows.append(seq)
        si = self._sampling_arrays(s, rows, flags)
        greedy_only = not bool(np.asarray(si.flags).any())
        out, plp = self._run_padded((inp, si, plp_next), want_plp, greedy_only)
        tokens, lp, rank, top_ids, top_lp = jax.device_get(
            (out.tokens, out.logprob, out.rank, out.top_ids, out.top_logprobs))
        res = RunnerOutput()
        for i, c in enumerate(chunks):
            if c.sample:
                res.sampled[c.seq.seq_id] = SeqResult(int(tokens[i]), float(lp[i]), int(rank[i]),
                                                      top_ids[i], top_lp[i])
        if plp is not None:
            p_lp, p_rank, p_ids, p_top = jax.device_get(plp)
            off = 0
            for c in chunks:
                n = c.num_tokens
                if c.seq.params.prompt_logprobs is not None:
                    d = res.prompt_logprobs.setdefault(c.seq.seq_id, {})
                    for j in range(n):
                        if plp_next[off + j] >= 0:
                            d[c.start + j + 1] = (float(p_lp[off + j]), int(p_rank[off + j]),
                                                  p_ids[off + j], p_top[off + j])
                off += n
        return res

    def _run_padded(self, batch: tuple[StepInputs, SamplingInputs, np.ndarray],
                    want_plp: bool, greedy_only: bool = False) -> tuple[SamplerOutput, Any]:
        if self.sharder is not None:  # multi-host leader: followers replay this step
            batch, want_plp, greedy_only = self.sharder.share_step((batch, want_plp, greedy_only))
        inp, si, plp_next = batch
        t, s = int(inp.token_ids.shape[0]), int(inp.kv_lens.shape[0])
        keys = (("step", t), ("argmax" if greedy_only else "sample", s)) + (
            (("prompt_lp", t),) if want_plp else ())
        for key in keys:
            if key not in self.compiled:
                if self.warm:
                    self.num_recompiles += 1
                    log.warning("compiling %s variant %d after warm-up", *key)
                self.compiled.add(key)
        if self.sharder is not None:
            inp, si, plp_next = self.sharder.put_inputs((inp, si, plp_next))
        self.kv, logits, h = self._step(self.state, self.kv, inp)
        if greedy_only:
            tokens = self._argmax(logits)
            zeros = np.zeros(tokens.shape, np.float32)
            top = np.zeros((tokens.shape[0], MAX_LOGPROBS), np.float32)
            out = SamplerOutput(tokens, zeros, zeros.astype(np.int32),
                                top.astype(np.int32), top)
        else:
            out = self._sample(logits, si)
        plp = self._prompt_lp(self.state, h, plp_next) if want_plp else None
        return out, plp

    def follow(self) -> None:
        """Multi-host follower: run the leader's steps (``sharding.distributed``) until it stops."""
        assert self.sharder is not None
        for batch, want_plp, greedy_only in self.sharder.follow_steps():
            self._run_padded(batch, want_plp, greedy_only)


def num_pages_for(model_cfg: ModelConfig, page_size: int, kv_dtype: Any, *, max_num_seqs: int,
                  max_model_len: int, num_kv_pages: int | None, kv_cache_gb: float | None,
                  memory_fraction: float, weight_bytes: int, kv_shards: int = 1,
                  devices: list[Any] | None = None) -> int:
    """Size the KV pool: explicit pages, explicit GiB, or (accelerators) a memory fraction.

    Sharded (``kv_shards`` > 1): each of ``devices`` holds 1/kv_shards of every page, and the
    pool is sized from the device with the least memory left after its weight shards.
    """
    per_page = kv_bytes_per_page(model_cfg, page_size, kv_dtype)
    useful = max_num_seqs * math.ceil(max_model_len / page_size) + 1
    if num_kv_pages:
        return int(num_kv_pages)
    if kv_cache_gb:
        return max(2, min(useful, int(kv_cache_gb * 2**30 // per_page)))
    devs = devices or [jax.devices()[0]]
    stats = [d.memory_stats() if hasattr(d, "memory_stats") else None for d in devs]
    if devs[0].platform != "cpu" and all(st and "bytes_limit" in st for st in stats):
        free = min(st["bytes_limit"] * memory_fraction - st.get("bytes_in_use", 0)
                   for st in stats if st)
        return max(2, min(useful, int(free // (per_page / kv_shards))))
    # CPU: a fixed 2 GiB pool by default (host RAM is shared with everything else).
    return max(2, min(useful, int(2 * 2**30 // per_page)))
