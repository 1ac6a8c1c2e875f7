"""Model runner: SchedulerOutput -> padded device inputs -> precompiled executables -> RunnerOutput.

Owns the parameters, the KV cache (explicit state: passed into the step, returned, donated) and
one XLA executable per compiled variant, all built ahead of time by ``warmup`` with
``jax.jit(...).lower(...).compile()``. ``execute`` dispatches to those executables only: a shape
outside them is an error (the executable refuses it), never a silent compile, and every step runs
under a ``CompileCounter`` so that anything that does make JAX trace or compile is counted
(``num_recompiles``, from JAX's own events).

Variants (axis letters: T tokens, S sequences, W page-table width, V vocab, D model dim):
- ``step[T]``: the model over ``StepInputs`` padded to T tokens, S = min(T, max_num_seqs) rows;
  returns the cache, and (generation) the LM-head logits ``f32[S, V]`` of each row's last token,
  and the hidden states ``[T, D]``. T is a power of two from ``min_token_bucket`` to
  ``max_num_batched_tokens`` (from 1: on XLA:CPU an 8-row step costs about twice a 1-row one);
  W is fixed by max_model_len (0 without a KV cache). Context length is not a compiled dimension:
  the attention loops over as many KV blocks as the longest sequence needs.
- ``sample[S]`` / ``draw[S]`` / ``draw_unfiltered[S]`` / ``argmax[S]`` / ``masked_argmax[S]``:
  the on-device sampler; ``draw`` / ``draw_unfiltered``, its tokens without the conditional
  stages, for steps that draw with temperature, top-k, top-p and min-p only (the common sampled
  step; ``sampler.draw``, with the native top-k kernel when the backend has it; the second when
  no row filters); a plain argmax for all-greedy steps with nothing to adjust; the argmax after
  the grammar mask when such a step has a constrained row (guided greedy decoding at argmax's
  cost).
- ``prompt_lp[T]``: prompt logprobs from the hidden states (rare; built when generating).
- ``pool[T]``: per-row first / last / summed hidden states and the classifier head's scores, for
  pooling requests (built when the engine serves pooling).
Separate executables rather than one: the model step varies with T only, the sampler with S only,
so compile time grows with the sum of the bucket counts instead of their product.

Penalty history (presence / frequency / repetition penalties): the sampler reads each penalised
row's tokens as ``i32[S, max_model_len]`` (``Sampling.history``). That array is never built on the
host: the runner keeps ``history``, ``i32[max_num_seqs, max_model_len]`` on the device
(replicated on a mesh), one row per history slot (``ScheduledRow.history_slot``, which the
scheduler gives a penalised sequence while it runs). Contract: row ``r`` holds, at position
``p``, the token at position ``p`` of the sequence holding slot ``r``, for every position that
sequence computed since it took the slot (each step writes its own token ids at their positions,
``hist_write[T]``, donated) or received as ``ScheduledRow.history_prefix`` (prefix-cache hits,
once per admission, ``hist_fill``). Positions at or past the sequence's length may hold a
previous holder's tokens; they are never read: ``hist_rows[S]`` gathers the step's penalised
rows and sets every position at or past the row's ``kv_len`` to -1 (the sampler's padding). A
decode step uploads ``i32[T]`` slots and ``i32[S]`` row slots instead of ``i32[S,
max_model_len]``. Preemption gives the slot back; recompute rewrites the row from position 0.

Grammar masks (structured outputs): a row whose ``SamplingRow.constrained`` is set needs its mask
row, which only the scheduler can compute (it owns the matchers). ``execute`` takes a fill
callback and calls it after dispatching the model step and before the sampler, so that the host
fill runs while the device computes the step; on a multi-host mesh it runs before the step is
shared, since the followers replay the leader's sampler inputs.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.stages import Compiled
from tqdm import tqdm

from models.inputs import HostStepInputs, KVCache, PackedChunk, StepInputs, pack_step_inputs
from models.pooling import pool_chunks
from serving.engine.compilation import CompileCounter
from serving.engine.pooling_params import PoolingKind
from serving.engine.records import (
    PooledChunk,
    PositionLogprob,
    RowResult,
    RunnerOutput,
    SampledToken,
    ScheduledRow,
    SchedulerOutput,
)
from serving.engine.sampler import (
    HostSamplingInputs,
    SamplerOutput,
    Sampling,
    SamplingFlags,
    SamplingInputs,
    TopK,
    argmax,
    draw,
    masked_argmax,
    prompt_logprobs,
    sample,
)
from serving.engine.sampling_params import BIAS_SLOTS
from sharding.rules import KV_CACHE_AXES

log = logging.getLogger("xlaserve.runner")

BIAS_WIDTH = BIAS_SLOTS  # logit_bias entries plus min_tokens bans (eos, stop ids)


@dataclass(frozen=True)
class KVLayout:
    """One layer's cache is two ``[K, P, B, H]`` arrays; ``num_layers`` of them."""

    num_layers: int
    num_kv_heads: int  # K
    head_dim: int  # H
    dtype: Any

    def bytes_per_page(self, page_size: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * page_size * self.head_dim * \
            jnp.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class Variant:
    """One executable as ``warmup`` builds it: ``jax.jit(fn, donate_argnums=donate)
    .lower(*args)`` with ``args`` abstract (``jax.ShapeDtypeStruct`` trees)."""

    key: tuple[str, int]
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    donate: tuple[int, ...] = ()


@dataclass(frozen=True)
class RunnerConfig:
    page_size: int  # B
    num_pages: int  # P; 0: the model keeps no KV cache (encoders)
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    generates: bool = True  # the LM head, the sampler and prompt logprobs are compiled
    pools: bool = False  # the pooled-row outputs are compiled (into the step when it does not
    # generate)
    min_token_bucket: int = 1
    buckets: tuple[int, ...] | None = None  # explicit token buckets (max_num_batched_tokens
    # is added); None: powers of two from min_token_bucket
    sampler_top_k: TopK | None = None  # the ``draw`` executable's top-k; None: lax.top_k

    def __post_init__(self) -> None:
        if not (self.generates or self.pools):
            raise ValueError("a runner generates, pools, or both")
        if self.buckets is not None and any(
                not 1 <= b <= self.max_num_batched_tokens for b in self.buckets):
            raise ValueError(f"token buckets must be in [1, max_num_batched_tokens="
                             f"{self.max_num_batched_tokens}], got {list(self.buckets)}")

    @property
    def table_width(self) -> int:  # W
        return -(-self.max_model_len // self.page_size) if self.num_pages else 0

    @property
    def token_buckets(self) -> list[int]:
        if self.buckets is not None:
            return sorted(set(self.buckets) | {self.max_num_batched_tokens})
        out, b = [], self.min_token_bucket
        while b < self.max_num_batched_tokens:
            out.append(b)
            b *= 2
        return [*out, self.max_num_batched_tokens]

    def num_seq_rows(self, t: int) -> int:
        return min(t, self.max_num_seqs)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PooledRows:
    first: jax.Array  # f32[S, D]: each row's first token this step
    last: jax.Array  # f32[S, D]: each row's last token this step
    total: jax.Array  # f32[S, D]: the sum over each row's tokens this step
    scores: jax.Array  # f32[S, L]: the classifier head on ``first`` (L = 0 without one)


# Writes the mask rows of a step's scheduled rows into the buffer (row i for ``rows[i]``).
MaskFill = Callable[[SchedulerOutput, np.ndarray], None]


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["inputs", "sampling", "prompt_next_ids", "history_slots",
                                "history_fills", "history_rows"],
                   meta_fields=["greedy_only", "pool"])
@dataclass(frozen=True)
class DeviceBatch:
    """A step's host-side inputs, and which executables run: what the multi-host leader shares
    with its followers before running it."""

    inputs: HostStepInputs
    sampling: HostSamplingInputs | None  # None: no row draws a token this step
    # every drawing row is greedy with nothing to adjust but, at most, a grammar mask: argmax,
    # or masked_argmax when a row is constrained
    greedy_only: bool
    prompt_next_ids: np.ndarray | None  # i32[T]: next prompt token per position (-1: none)
    pool: bool
    # Penalty history (see the module docstring): each token's history slot (i32[T], -1: not
    # recorded; None: no row has a slot), the rows to fill first (each i32[1 + max_model_len]:
    # the slot, then the prefix padded with -1), and each sampling row's slot for the sampler
    # (i32[S], -1: none; None: no row is penalised).
    history_slots: np.ndarray | None = None
    history_fills: tuple[np.ndarray, ...] = ()
    history_rows: np.ndarray | None = None


class ModelRunner:
    def __init__(self, model: nnx.Module, cfg: RunnerConfig, kv: KVLayout | None,
                 sharder: Any = None, abstract: bool = False) -> None:
        """``abstract``: ``model`` may be abstract (``nnx.eval_shape``) and the KV cache is
        ``jax.ShapeDtypeStruct``s with the sharder's layout, nothing allocated: such a runner
        only hands out ``variants`` (lowering for another platform), it cannot run."""
        if (kv is None) != (cfg.num_pages == 0):
            raise ValueError("a KV layout needs KV pages, and pages need a KV layout")
        self.cfg = cfg
        self.graphdef, state = nnx.split(model)
        # Plain nested dicts of arrays: jit flattens these in C++, while nnx Variables flatten in
        # Python on every call (~10 ms per step for a 30-layer model).
        self._state_template = state
        self.state = nnx.to_pure_dict(state)
        self.sharder = sharder  # sharding.Sharder or None (single device)
        self.kv_layout = kv
        self.kv: KVCache = []
        self.kv_bytes = 0
        if kv is not None:
            shape = (kv.num_kv_heads, cfg.num_pages, cfg.page_size, kv.head_dim)
            make: Callable[[], Any] = (lambda: jnp.zeros(shape, kv.dtype)) if sharder is None \
                else (lambda: sharder.zeros_kv(shape, kv.dtype))
            if abstract:
                spec = jax.ShapeDtypeStruct(shape, kv.dtype, sharding=None if sharder is None
                                            else sharder.sharding(KV_CACHE_AXES, shape))
                make = lambda: spec
            self.kv = [(make(), make()) for _ in range(kv.num_layers)]
            self.kv_bytes = kv.bytes_per_page(cfg.page_size) * cfg.num_pages
        self.num_labels = int(getattr(getattr(model, "cfg", None), "num_labels", 0) or 0) \
            if hasattr(model, "classify") else 0
        self._exe: dict[tuple[str, int], Compiled] = {}
        self.compile_seconds: dict[int, float] = {}
        self.compiles = CompileCounter()
        self._consts: dict[tuple[str, int], jax.Array] = {}
        self.num_steps = 0
        self.num_padded_tokens = 0  # the T bucket of every step, summed
        self.mask_width = 0  # ceil(V / 32), the words of a grammar mask row; set by warmup
        # The penalty history (module docstring), i32[max_num_seqs, max_model_len].
        self.history: Any = None
        if cfg.generates:
            hshape = (cfg.max_num_seqs, cfg.max_model_len)
            self.history = self._spec(hshape, jnp.int32) if abstract else \
                self._put(np.full(hshape, -1, np.int32))

    @property
    def num_recompiles(self) -> int:
        """Traces and compiles JAX performed while executing steps (0 unless something is off
        the precompiled set)."""
        return self.compiles.count

    @property
    def num_executables(self) -> int:
        return len(self._exe)

    # ---- the functions that are compiled -----------------------------------------------------
    def _model(self, pure: dict[str, Any]) -> Any:
        state = jax.tree_util.tree_map(lambda x: x, self._state_template)
        nnx.replace_by_pure_dict(state, pure)
        return nnx.merge(self.graphdef, state)

    def _step_fn(self, state: dict[str, Any], kv: KVCache, inp: StepInputs) -> tuple[Any, ...]:
        model = self._model(state)
        h, kv = model(kv, inp)  # [T, D]
        if not self.cfg.generates:  # every step pools: one executable, one dispatch
            return kv, self._pool_fn(state, h, inp), h
        logits = model.logits(h[inp.logits_indices])  # f32[S, V]
        if self.sharder is not None:  # whole vocab rows: the sampler is the same on any mesh
            logits = self.sharder.gather_logits(logits)
        return kv, logits, h

    def _draw_fn(self, logits: jax.Array, si: SamplingInputs) -> jax.Array:
        return draw(logits, si, self.cfg.sampler_top_k or jax.lax.top_k)

    def _draw_unfiltered_fn(self, logits: jax.Array, si: SamplingInputs) -> jax.Array:
        return draw(logits, si, filtered=False)

    def _prompt_lp_fn(self, state: dict[str, Any], h: jax.Array, next_ids: jax.Array
                      ) -> tuple[jax.Array, ...]:
        return prompt_logprobs(self._model(state).logits(h), next_ids)

    def _pool_fn(self, state: dict[str, Any], h: jax.Array, inp: StepInputs) -> PooledRows:
        first, last, total = pool_chunks(h, inp.cu_q_lens)
        if self.num_labels:
            scores = self._model(state).classify(first)
        else:
            scores = jnp.zeros((first.shape[0], 0), jnp.float32)
        return PooledRows(first, last, total, scores)

    # ---- building the executables ------------------------------------------------------------
    def bucket(self, num_tokens: int) -> int:
        for b in self.cfg.token_buckets:
            if num_tokens <= b:
                return b
        raise ValueError(f"{num_tokens} tokens exceed max_num_batched_tokens")

    def _spec(self, shape: tuple[int, ...], dtype: Any, sharding: Any = None
              ) -> jax.ShapeDtypeStruct:
        if sharding is None and self.sharder is not None:
            sharding = self.sharder.replicated
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    def _abstract(self, tree: Any) -> Any:
        return jax.tree_util.tree_map(lambda x: self._spec(np.shape(x), np.asarray(x).dtype),
                                      tree)

    def _compile(self, key: tuple[str, int], fn: Callable[..., Any], *args: Any,
                 donate: tuple[int, ...] = ()) -> Compiled:
        exe = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
        self._exe[key] = exe
        return exe

    def warmup(self) -> float:
        """Build every executable ahead of time (progress bar; each bucket's time logged)."""
        t_all = time.perf_counter()
        for t in tqdm(self.cfg.token_buckets, desc="compiling step buckets", unit="bucket"):
            t0 = time.perf_counter()
            s = self.cfg.num_seq_rows(t)
            inp = self._abstract(self.empty_inputs(t))
            step = self._compile(("step", t), self._step_fn, self.state, self.kv, inp,
                                 donate=(1,))
            out = step.out_info
            h_spec = self._spec(out[-1].shape, out[-1].dtype, step.output_shardings[-1])
            if self.cfg.generates:
                lg = self._spec(out[1].shape, out[1].dtype, step.output_shardings[1])
                self.mask_width = -(-int(out[1].shape[1]) // 32)
                ids = self._spec((t,), jnp.int32)
                self._compile(("prompt_lp", t), self._prompt_lp_fn, self.state, h_spec, ids)
                if ("sample", s) not in self._exe:
                    si = self._abstract(self._sampling_inputs(s, [], all_flags=True))
                    self._compile(("sample", s), sample, lg, si)
                    self._compile(("draw", s), self._draw_fn, lg, si)
                    self._compile(("draw_unfiltered", s), self._draw_unfiltered_fn, lg, si)
                    self._compile(("argmax", s), argmax, lg)
                    self._compile(("masked_argmax", s), masked_argmax, lg, si.mask)
                    self._compile(("hist_rows", s), _history_rows, self._like(self.history),
                                  self._spec((s,), jnp.int32), self._spec((s,), jnp.int32))
                self._compile(("hist_write", t), _history_write, self._like(self.history),
                              ids, ids, ids, donate=(0,))
                if ("hist_fill", 0) not in self._exe:
                    self._compile(("hist_fill", 0), _history_fill, self._like(self.history),
                                  self._spec((1 + self.cfg.max_model_len,), jnp.int32),
                                  donate=(0,))
            if self.cfg.pools and self.cfg.generates:
                self._compile(("pool", t), self._pool_fn, self.state, h_spec, inp)
            self.compile_seconds[t] = dt = time.perf_counter() - t0
            log.info("compiled bucket T=%d S=%d in %.2fs", t, s, dt)
        return time.perf_counter() - t_all

    def variants(self, t: int) -> list[Variant]:
        """The executables ``warmup`` builds for token bucket ``t`` that a generating step runs
        (``step``, then the samplers on its logits, and the penalty history's write, fill and
        gather), each with the function, abstract arguments (weights and KV cache included, with
        their shardings) and donated positions, so that other tools can lower exactly what the
        engine compiles, for another platform, without weights (``abstract=True``). The
        sampler's logits are replicated (the step gathers them, ``Sharder.gather_logits``)."""
        s = self.cfg.num_seq_rows(t)
        state = jax.tree_util.tree_map(self._like, self.state)
        kv = jax.tree_util.tree_map(self._like, self.kv)
        inp = self._abstract(self.empty_inputs(t))
        step = Variant(("step", t), self._step_fn, (state, kv, inp), donate=(1,))
        out = jax.eval_shape(self._step_fn, state, kv, inp)
        lg = self._spec(out[1].shape, out[1].dtype)
        self.mask_width = -(-int(out[1].shape[1]) // 32)  # as warmup sets it
        si = self._abstract(self._sampling_inputs(s, [], all_flags=True))
        return [step, Variant(("sample", s), sample, (lg, si)),
                # lax.top_k: the native kernel is this host's, not the target platform's
                Variant(("draw", s), draw, (lg, si)),
                Variant(("draw_unfiltered", s), functools.partial(draw, filtered=False), (lg, si)),
                Variant(("argmax", s), argmax, (lg,)),
                Variant(("masked_argmax", s), masked_argmax, (lg, si.mask)),
                Variant(("hist_write", t), _history_write,
                        (self._like(self.history), *[self._spec((t,), jnp.int32)] * 3),
                        donate=(0,)),
                Variant(("hist_fill", 0), _history_fill,
                        (self._like(self.history),
                         self._spec((1 + self.cfg.max_model_len,), jnp.int32)), donate=(0,)),
                Variant(("hist_rows", s), _history_rows,
                        (self._like(self.history), self._spec((s,), jnp.int32),
                         self._spec((s,), jnp.int32)))]

    def _like(self, x: Any) -> jax.ShapeDtypeStruct:
        """``x`` (array or ShapeDtypeStruct) as a ShapeDtypeStruct keeping its sharding."""
        sharding = getattr(x, "sharding", None)
        if sharding is None and self.sharder is not None:
            sharding = self.sharder.replicated
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    def step_hlo(self, t: int) -> str:
        """The optimized HLO of the model step for token bucket ``t`` (tools and tests: the
        per-op profile, the in-place KV-cache check)."""
        return self._exe[("step", t)].as_text() or ""

    def empty_inputs(self, t: int) -> HostStepInputs:
        """Host ``StepInputs`` of bucket ``t`` with no real token (warm-up shapes)."""
        return pack_step_inputs([], t, self.cfg.num_seq_rows(t), self.cfg.table_width,
                                self.cfg.page_size)

    # ---- host side ---------------------------------------------------------------------------
    def _const(self, name: str, rows: int, make: Callable[[], np.ndarray]) -> jax.Array:
        key = (name, rows)
        if key not in self._consts:
            self._consts[key] = self._put(make())
        return self._consts[key]

    def _put(self, x: Any) -> Any:
        return jax.device_put(x) if self.sharder is None else self.sharder.put_replicated(x)

    def _sampling_inputs(self, s: int, rows: list[ScheduledRow],
                         all_flags: bool = False) -> HostSamplingInputs:
        """Per-row sampling arrays for the rows that draw (others stay neutral)."""
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
        any_sample = any_filter = any_pen = any_bias = any_lp = any_mask = all_flags
        for i, row in enumerate(rows):
            sr = row.sampling
            if sr is None:
                continue
            p = sr.params
            temp[i], top_k[i], top_p[i], min_p[i] = p.temperature, p.top_k, p.top_p, p.min_p
            pres[i], freq[i], rep[i] = (p.presence_penalty, p.frequency_penalty,
                                        p.repetition_penalty)
            seeds[i], counters[i], prompt_lens[i] = sr.seed, sr.num_output, sr.prompt_len
            any_sample |= not p.greedy
            any_filter |= (not p.greedy) and (p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0)
            any_pen |= p.uses_penalties
            any_bias |= bool(p.logit_bias) or bool(sr.banned)
            any_lp |= p.logprobs is not None
            any_mask |= sr.constrained
        if any_bias and rows:
            bias_ids = np.full((s, BIAS_WIDTH), -1, np.int32)
            bias_vals = np.zeros((s, BIAS_WIDTH), np.float32)
            for i, row in enumerate(rows):
                if row.sampling is None:
                    continue
                entries = [(int(k), float(v)) for k, v in row.sampling.params.logit_bias.items()]
                entries += [(b, -np.inf) for b in row.sampling.banned]
                assert len(entries) <= BIAS_WIDTH, "InputProcessor bounds logit_bias + bans"
                if entries:
                    bias_ids[i, :len(entries)] = [e[0] for e in entries]
                    bias_vals[i, :len(entries)] = [e[1] for e in entries]
            b_ids, b_vals = self._put(bias_ids), self._put(bias_vals)
        else:
            b_ids = self._const("bias_ids", s, lambda: np.full((s, BIAS_WIDTH), -1, np.int32))
            b_vals = self._const("bias_vals", s, lambda: np.zeros((s, BIAS_WIDTH), np.float32))
        # Penalised steps replace this with the device history's rows (``_run``).
        hw = self.cfg.max_model_len
        history = self._const("history", s, lambda: np.full((s, hw), -1, np.int32))
        # All ones; a step with a constrained row gets its filled mask later (``_with_mask``).
        mask = self._const("mask", s, lambda: np.full((s, self.mask_width), -1, np.int32))
        flags = SamplingFlags(*(np.asarray(f, np.bool_) for f in (
            any_sample, any_filter, any_pen, any_bias, any_lp, any_mask)))
        return Sampling(
            temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, presence=pres,
            frequency=freq, repetition=rep, seeds=seeds, counters=counters, bias_ids=b_ids,
            bias_vals=b_vals, history=history, prompt_lens=prompt_lens, mask=mask, flags=flags)

    def _batch(self, sched: SchedulerOutput) -> tuple[DeviceBatch, np.ndarray]:
        """The step's device batch, and each row's first token offset (i32[len(rows)])."""
        rows = list(sched.rows)
        t = self.bucket(sched.num_tokens)
        s = self.cfg.num_seq_rows(t)
        if len(rows) > s:
            raise ValueError(f"{len(rows)} sequences exceed the {s} rows of bucket T={t}")
        inp = pack_step_inputs(
            [PackedChunk(r.token_ids, r.start, r.pages, r.token_type_ids) for r in rows],
            t, s, self.cfg.table_width, self.cfg.page_size)
        offsets = np.asarray(inp.cu_q_lens[:len(rows)])
        sampling = None
        greedy_only = True
        if any(r.sampling is not None for r in rows):
            sampling = self._sampling_inputs(s, rows)
            f = sampling.flags
            greedy_only = not any(bool(x) for x in (f.sample, f.penalties, f.bias, f.logprobs))
        next_ids = None
        if any(r.prompt_logprobs is not None for r in rows):
            next_ids = np.full(t, -1, np.int32)
            for r, off in zip(rows, offsets, strict=True):
                if r.prompt_logprobs is not None:
                    next_ids[off:off + r.num_tokens] = r.prompt_logprobs.next_ids
        pool = any(r.pooling is not None for r in rows)
        hist_slots, fills, hist_rows = self._history_inputs(rows, offsets, t, s, sampling)
        return DeviceBatch(inp, sampling, greedy_only, next_ids, pool, hist_slots, fills,
                           hist_rows), offsets

    def _history_inputs(self, rows: list[ScheduledRow], offsets: np.ndarray, t: int, s: int,
                        sampling: HostSamplingInputs | None
                        ) -> tuple[np.ndarray | None, tuple[np.ndarray, ...], np.ndarray | None]:
        """The penalty-history fields of a step's ``DeviceBatch`` (see ``DeviceBatch``)."""
        if not any(r.history_slot >= 0 for r in rows):
            return None, (), None
        slots = np.full(t, -1, np.int32)
        fills = []
        for r, off in zip(rows, offsets, strict=True):
            slots[off:off + r.num_tokens] = r.history_slot
            if r.history_prefix is not None and r.history_slot >= 0:
                fill = np.full(1 + self.cfg.max_model_len, -1, np.int32)
                fill[0] = r.history_slot
                fill[1:1 + len(r.history_prefix)] = r.history_prefix
                fills.append(fill)
        row_slots = None
        if sampling is not None and bool(sampling.flags.penalties):
            row_slots = np.full(s, -1, np.int32)
            for i, r in enumerate(rows):
                if r.sampling is not None and r.sampling.params.uses_penalties:
                    row_slots[i] = r.history_slot
        return slots, tuple(fills), row_slots

    def _record_history(self, batch: DeviceBatch, inp: Any) -> None:
        """Write the step's prefixes, then its own tokens, into the device history."""
        put = (lambda x: x) if self.sharder is None else self.sharder.put_inputs
        for fill in batch.history_fills:
            self.history = self._exe[("hist_fill", 0)](self.history, put(fill))
        if batch.history_slots is not None:
            t = int(batch.history_slots.shape[0])
            self.history = self._exe[("hist_write", t)](
                self.history, inp.token_ids, inp.positions, put(batch.history_slots))

    def _with_mask(self, batch: DeviceBatch, fill: Callable[[np.ndarray], None] | None
                   ) -> DeviceBatch:
        """``batch`` with its grammar mask filled by ``fill``, when a row is constrained."""
        si = batch.sampling
        if fill is None or si is None or not bool(si.flags.mask):
            return batch
        buf = np.full((int(si.temperature.shape[0]), self.mask_width), -1, np.int32)
        fill(buf)
        return dataclasses.replace(batch, sampling=dataclasses.replace(si, mask=self._put(buf)))

    def _run(self, batch: DeviceBatch, fill: Callable[[np.ndarray], None] | None = None
             ) -> tuple[Any, ...]:
        """Run a batch's executables; returns (sampler output, prompt logprobs, pooled rows,
        hidden states), each None when not run. Leader and followers both come through here
        (a follower's batch already holds the leader's mask). ``fill`` writes the mask rows of
        the constrained rows; it runs while the device computes the model step, except on a
        multi-host mesh, where the mask must be in the batch the leader shares."""
        if self.sharder is not None and self.sharder.lockstep is not None:
            batch = self._with_mask(batch, fill)
            fill = None
        if self.sharder is not None:
            batch = self.sharder.share_step(batch)  # multi-host leader: followers replay it
        inp = batch.inputs
        t = int(inp.token_ids.shape[0])
        s = int(inp.kv_lens.shape[0])
        if self.sharder is not None:
            inp = self.sharder.put_inputs(inp)
        outs = self._exe[("step", t)](self.state, self.kv, inp)
        self.kv, h = outs[0], outs[-1]
        batch = self._with_mask(batch, fill)  # dispatched: the host fill overlaps the step
        self._record_history(batch, inp)
        sampled = plp = pooled = None
        if batch.sampling is not None:
            logits = outs[1]
            if batch.greedy_only and bool(batch.sampling.flags.mask):
                mask = batch.sampling.mask
                if self.sharder is not None:
                    mask = self.sharder.put_inputs(mask)
                sampled = self._exe[("masked_argmax", s)](logits, mask)
            elif batch.greedy_only:
                sampled = self._exe[("argmax", s)](logits)
            else:
                si = batch.sampling
                f = si.flags
                plain = not any(bool(x) for x in (f.penalties, f.bias, f.logprobs, f.mask))
                if self.sharder is not None:
                    si = self.sharder.put_inputs(si)
                if batch.history_rows is not None:
                    rows = batch.history_rows if self.sharder is None else \
                        self.sharder.put_inputs(batch.history_rows)
                    si = dataclasses.replace(si, history=self._exe[("hist_rows", s)](
                        self.history, rows, inp.kv_lens))
                name = ("draw" if bool(f.filter) else "draw_unfiltered") if plain else "sample"
                sampled = self._exe[(name, s)](logits, si)
        if batch.prompt_next_ids is not None:
            ids = batch.prompt_next_ids
            if self.sharder is not None:
                ids = self.sharder.put_inputs(ids)
            plp = self._exe[("prompt_lp", t)](self.state, h, ids)
        if batch.pool:
            pooled = outs[1] if not self.cfg.generates else \
                self._exe[("pool", t)](self.state, h, inp)
        return sampled, plp, pooled, h

    def kv_intact(self) -> bool:
        """Whether every KV-cache buffer is still alive: a step that failed after XLA took its
        donated cache leaves deleted buffers, and the pool's contents are then gone."""
        return not any(x.is_deleted() for x in jax.tree_util.tree_leaves(self.kv))

    def execute(self, sched: SchedulerOutput, fill_masks: MaskFill | None = None
                ) -> RunnerOutput:
        """Run one step; ``RunnerOutput.rows[i]`` belongs to ``sched.rows[i]``.
        ``fill_masks(sched, buf)`` writes the grammar mask rows (``buf``: all ones, i32[S,
        mask_width]); a step with a constrained row and no fill is an error."""
        if sched.empty:
            return RunnerOutput()
        if fill_masks is None and any(r.sampling is not None and r.sampling.constrained
                                      for r in sched.rows):
            raise ValueError("a grammar-constrained row needs a mask fill")
        with self.compiles.watching():
            batch, offsets = self._batch(sched)
            self.num_steps += 1
            self.num_padded_tokens += int(batch.inputs.token_ids.shape[0])
            fill = None if fill_masks is None else functools.partial(fill_masks, sched)
            sampled, plp, pooled, h = self._run(batch, fill)
            return self._results(sched, batch, offsets, sampled, plp, pooled, h)

    def _results(self, sched: SchedulerOutput, batch: DeviceBatch, offsets: np.ndarray,
                 sampled: Any, plp: Any, pooled: PooledRows | None, h: jax.Array
                 ) -> RunnerOutput:
        rows = sched.rows
        tokens = lp = rank = top_ids = top_lp = None
        if isinstance(sampled, SamplerOutput):
            tokens, lp, rank, top_ids, top_lp = jax.device_get(
                (sampled.tokens, sampled.logprob, sampled.rank, sampled.top_ids,
                 sampled.top_logprobs))
        elif sampled is not None:
            tokens = np.asarray(jax.device_get(sampled))
        p_lp = p_rank = p_ids = p_top = None
        if plp is not None:
            p_lp, p_rank, p_ids, p_top = jax.device_get(plp)
        pool_host: dict[str, np.ndarray] | None = None
        if pooled is not None:
            pool_host = {k: np.asarray(v) for k, v in
                         vars(jax.device_get(pooled)).items()}
        h_host = None
        if any(r.pooling == PoolingKind.TOKENS for r in rows):
            h_host = np.asarray(jax.device_get(h), np.float32)
        out: list[RowResult] = []
        for i, (r, off) in enumerate(zip(rows, offsets, strict=True)):
            token = None
            if r.sampling is not None and tokens is not None:
                k = r.sampling.params.logprobs
                if k is None or lp is None:
                    token = SampledToken(int(tokens[i]))
                else:
                    assert rank is not None and top_ids is not None and top_lp is not None
                    token = SampledToken(int(tokens[i]), float(lp[i]), int(rank[i]),
                                         tuple(int(x) for x in top_ids[i, :k]),
                                         tuple(float(x) for x in top_lp[i, :k]))
            positions: tuple[PositionLogprob, ...] = ()
            if r.prompt_logprobs is not None and p_lp is not None:
                assert p_rank is not None and p_ids is not None and p_top is not None
                k = r.prompt_logprobs.num_top
                positions = tuple(
                    PositionLogprob(r.start + j + 1, nxt, float(p_lp[off + j]),
                                    int(p_rank[off + j]),
                                    tuple(int(x) for x in p_ids[off + j, :k]),
                                    tuple(float(x) for x in p_top[off + j, :k]))
                    for j, nxt in enumerate(r.prompt_logprobs.next_ids) if nxt >= 0)
            chunk = None
            if r.pooling is not None and pool_host is not None:
                chunk = PooledChunk(
                    _frozen(pool_host["first"][i]), _frozen(pool_host["last"][i]),
                    _frozen(pool_host["total"][i]),
                    tokens=_frozen(h_host[off:off + r.num_tokens]) if h_host is not None
                    and r.pooling == PoolingKind.TOKENS else None,
                    scores=_frozen(pool_host["scores"][i]) if r.pooling == PoolingKind.SCORES
                    else None)
            out.append(RowResult(token, positions, chunk))
        return RunnerOutput(tuple(out))

    def follow(self) -> None:
        """Multi-host follower: run the leader's steps (``sharding.distributed``) until it stops."""
        assert self.sharder is not None
        for batch in self.sharder.follow_steps():
            self._run(batch)


# ---- penalty history (module docstring; compiled by ``warmup``) --------------------------------
def _history_write(history: jax.Array, token_ids: jax.Array, positions: jax.Array,
                   slots: jax.Array) -> jax.Array:
    """Each token at its position of its slot's row; tokens of slot -1 (padding, rows without
    penalties) are dropped."""
    rows = jnp.where(slots >= 0, slots, history.shape[0])  # out of range: dropped
    return history.at[rows, positions].set(token_ids, mode="drop")


def _history_fill(history: jax.Array, fill: jax.Array) -> jax.Array:
    """Row ``fill[0]`` set to ``fill[1:]`` (a prefix padded with -1)."""
    return jax.lax.dynamic_update_slice(history, fill[None, 1:], (fill[0], jnp.int32(0)))


def _history_rows(history: jax.Array, slots: jax.Array, lens: jax.Array) -> jax.Array:
    """``Sampling.history`` for the step: row i is slot ``slots[i]``'s first ``lens[i]`` tokens,
    -1 after them and for rows of slot -1 (whatever the slot holds there: a previous holder's
    tail is never read)."""
    rows = history[jnp.maximum(slots, 0)]
    keep = (jnp.arange(history.shape[1])[None, :] < lens[:, None]) & (slots[:, None] >= 0)
    return jnp.where(keep, rows, -1)


def _frozen(x: np.ndarray) -> np.ndarray:
    out = np.array(x, np.float32)
    out.setflags(write=False)
    return out


def num_pages_for(kv: KVLayout, page_size: int, *, max_num_seqs: int, max_model_len: int,
                  num_kv_pages: int | None, kv_cache_gb: float | None, memory_fraction: float,
                  kv_shards: int = 1, devices: list[Any] | None = None) -> int:
    """Size the KV pool: explicit pages, explicit GiB, or (accelerators) a memory fraction.

    Sharded (``kv_shards`` > 1): each of ``devices`` holds 1/kv_shards of every page, and the
    pool is sized from the device with the least memory left after its weight shards.
    """
    per_page = kv.bytes_per_page(page_size)
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
