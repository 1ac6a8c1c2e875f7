"""Continuous-batching scheduler: token budget, chunked prefill, recompute preemption, and the
update after each step. Pure Python (no JAX); it owns every live ``Request`` and ``Sequence``.

``schedule()`` is called once per engine step and returns a frozen ``SchedulerOutput``: which
sequences run this step and which of their tokens. Running sequences go first (in admission
order), each taking min(remaining tokens, budget), so decodes and prompt chunks share one step;
then waiting sequences are admitted while budget, ``max_num_seqs`` and free pages allow. When a
running sequence needs a page and none is free, the newest running sequence is preempted: its
pages are freed and it goes back to the front of the queue to be recomputed later (its tokens are
kept). Without chunked prefill (encoders) a prompt is scheduled whole or not at all.

``update_from_output(scheduler_output, runner_output)`` applies a step's results: progress, page
commits, appended tokens, and the stop checks that need no text (stop token ids, EOS, length);
it returns one ``SeqOutput`` per sequence that produced something. Stop *strings* need text and
are checked off the engine thread (``serving.engine.output_processor``), which then finishes the
sequence through ``finish_sequence``. Pooling requests are prompts with no output tokens: they
finish, with their pooled result, in the update of the step that computes their last prompt token.
Pages never leak (see ``KVCacheManager.check``).

Penalty history: a running sequence whose sampling uses penalties holds one of ``max_num_seqs``
history slots, taken at admission and given back when it leaves ``running`` (finish, abort,
preemption); rows name it (``ScheduledRow.history_slot``) and the runner keeps that slot's
tokens on the device, written from each step's own tokens. A row after admission that starts
past 0 (prefix-cache hit) carries the tokens before it once (``history_prefix``); nothing
proportional to the sequence's length crosses to the runner per step.

Structured outputs: each sequence of a constrained request owns a grammar matcher (``n > 1``: one
copy each), advanced here by every appended token (a matcher gated on the end of a reasoning
model's thinking only watches for it). Rows only say that they are constrained;
``fill_masks`` writes their mask rows when the runner asks (while the device runs the step). A
token the grammar refuses, or a matcher over its parser limits, finishes that sequence with
"error"; a complete grammar lets EOS through even below ``min_tokens`` (it allows nothing else).
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

import numpy as np

from serving.engine.kv_cache_manager import KVCacheManager
from serving.engine.outputs import SeqOutput
from serving.engine.records import (
    PromptLogprobRow,
    RunnerOutput,
    SamplingRow,
    ScheduledRow,
    SchedulerOutput,
)
from serving.engine.request import EngineRequest, PoolAccumulator, Request, SeqStatus, Sequence
from serving.engine.structured_output import GrammarBackend, GrammarMatcher


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    chunked_prefill: bool = True  # False: every prompt runs whole in one step (encoders)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be at least max_num_seqs")
        if not self.chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at "
                             f"least max_model_len ({self.max_model_len}) when prompts are not "
                             f"chunked")


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, kv: KVCacheManager,
                 grammars: GrammarBackend | None = None) -> None:
        self.cfg = cfg
        self.kv = kv
        self.grammars = grammars  # None: constrained requests are refused
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.requests: dict[str, Request] = {}
        self.seqs: dict[int, Sequence] = {}
        self._seq_ids = itertools.count()
        self.num_preemptions = 0
        self.num_aborted = 0  # requests aborted with unfinished choices (disconnects, shutdown)
        self.num_generated = 0  # output tokens appended, over all sequences
        self._free_history_slots = list(range(cfg.max_num_seqs - 1, -1, -1))

    # ---- admission and release ---------------------------------------------------------------
    def add(self, spec: EngineRequest) -> None:
        """Queue a validated request: one sequence per choice. Raises ``ValueError`` for a
        duplicate id, or a grammar without a backend or whose matcher cannot be built."""
        if spec.request_id in self.requests:
            raise ValueError(f"duplicate request id {spec.request_id!r}")
        matcher: GrammarMatcher | None = None
        if spec.grammar is not None:
            if self.grammars is None:
                raise ValueError("this engine has no grammar backend (structured outputs)")
            matcher = self.grammars.new_matcher(spec.grammar, spec.grammar_after)
        req = Request(spec)
        for i in range(spec.n):
            seq = Sequence(next(self._seq_ids), req, i, list(spec.prompt_ids))
            if spec.pooling is not None:
                seq.pool = PoolAccumulator()
            if matcher is not None:
                seq.matcher = matcher if i == 0 else matcher.copy()
            req.seqs.append(seq)
            self.seqs[seq.seq_id] = seq
            self.waiting.append(seq)
        self.requests[spec.request_id] = req

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> list[SeqOutput]:
        """Finish every unfinished choice of a request with "abort"; [] for an unknown id."""
        req = self.requests.get(request_id)
        if req is None:
            return []
        outs = [SeqOutput(request_id, s.index, finish_reason="abort") for s in req.seqs
                if s.status != SeqStatus.FINISHED]
        for s in list(req.seqs):
            self.finish_sequence(s)
        self.num_aborted += bool(outs)
        return outs

    def fail_step(self, sched: SchedulerOutput) -> list[SeqOutput]:
        """A step that could not run (out of memory): every request with a row in it ends, each
        unfinished choice with finish_reason "error", and gives its pages back; requests not in
        the step are untouched."""
        outs: list[SeqOutput] = []
        for rid in dict.fromkeys(self.seqs[r.seq_id].request.request_id for r in sched.rows):
            req = self.requests[rid]
            outs.extend(SeqOutput(rid, s.index, finish_reason="error") for s in req.seqs
                        if s.status != SeqStatus.FINISHED)
            for s in list(req.seqs):
                self.finish_sequence(s)
        return outs

    @property
    def num_pages_held(self) -> int:
        """Distinct KV pages the live sequences own (shared prefix pages counted once)."""
        return len({p for s in self.seqs.values() for p in s.pages})

    def finish_sequence(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence wherever it is (idempotent)."""
        if seq.status == SeqStatus.FINISHED:
            return
        if seq.status == SeqStatus.RUNNING:
            self.running.remove(seq)
            self._release_history_slot(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free_seq(seq)
        seq.status = SeqStatus.FINISHED
        seq.matcher = None
        del self.seqs[seq.seq_id]
        if seq.request.finished:
            self.requests.pop(seq.request.request_id, None)

    # ---- the step ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        rows: list[ScheduledRow] = []
        preempted: list[int] = []
        budget = self.cfg.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(len(seq.tokens) - seq.num_computed, budget)
            while not self.kv.allocate(seq, seq.num_computed + n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim.seq_id)
                if victim is seq:
                    break
            else:
                rows.append(self._row(seq, n))
                budget -= n
                i += 1
                continue
            break  # seq itself was preempted: nothing after it is left to schedule
        if preempted:
            return SchedulerOutput(tuple(rows), tuple(preempted))
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting.popleft()
            if not seq.ready:
                skipped.append(seq)
                continue
            if seq.num_computed == 0 and not seq.pages and not (
                    seq.spec.full_prompt and seq.index == 0):
                self.kv.match_prefix(seq)
            n = min(len(seq.tokens) - seq.num_computed, budget)
            whole = n == len(seq.tokens) - seq.num_computed
            if (not whole and not self.cfg.chunked_prefill) or \
                    not self.kv.allocate(seq, seq.num_computed + n):
                self.kv.free_seq(seq)  # give back prefix hits; retry when room frees up
                self.waiting.appendleft(seq)
                break
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            prefix = None
            if seq.spec.sampling is not None and seq.spec.sampling.uses_penalties:
                seq.history_slot = self._free_history_slots.pop()
                if seq.num_computed:
                    prefix = tuple(seq.tokens[:seq.num_computed])
            rows.append(self._row(seq, n, prefix))
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        return SchedulerOutput(tuple(rows), ())

    def _release_history_slot(self, seq: Sequence) -> None:
        if seq.history_slot >= 0:
            self._free_history_slots.append(seq.history_slot)
            seq.history_slot = -1

    def _row(self, seq: Sequence, n: int, history_prefix: tuple[int, ...] | None = None
             ) -> ScheduledRow:
        spec, start = seq.spec, seq.num_computed
        end = start + n
        sampling = None
        p = spec.sampling
        if p is not None and end == len(seq.tokens):
            banned: tuple[int, ...] = ()
            # a complete grammar allows only EOS: banning it would leave nothing to draw
            if seq.num_output < p.min_tokens and not (
                    seq.matcher is not None and seq.matcher.is_stopped()):
                bans = set(p.stop_token_ids) | (set() if p.ignore_eos else set(spec.eos_ids))
                banned = tuple(sorted(bans))
            sampling = SamplingRow(
                params=p, seed=(spec.seed + 1_000_003 * seq.index) & 0xFFFFFFFF,
                num_output=seq.num_output, prompt_len=seq.prompt_len, banned=banned,
                constrained=seq.matcher is not None and seq.matcher.active)
        plp = None
        if p is not None and p.prompt_logprobs is not None and seq.index == 0 and \
                start < seq.prompt_len - 1:
            plen = seq.prompt_len
            plp = PromptLogprobRow(p.prompt_logprobs, tuple(
                seq.tokens[q + 1] if q + 1 < plen else -1 for q in range(start, end)))
        types = spec.token_type_ids[start:end] if spec.token_type_ids is not None else None
        return ScheduledRow(seq.seq_id, tuple(seq.tokens[start:end]), start, tuple(seq.pages),
                            sampling=sampling, prompt_logprobs=plp, pooling=spec.pooling_kind,
                            token_type_ids=types, history_slot=seq.history_slot,
                            history_prefix=history_prefix)

    def fill_masks(self, sched: SchedulerOutput, out: np.ndarray) -> None:
        """Write the grammar mask of each constrained row of ``sched`` into row i of ``out``
        (``i32[S, ceil(V/32)]``, all ones where no grammar applies); the runner's fill callback,
        called on the engine thread between ``schedule`` and ``update_from_output``."""
        matchers = [self.seqs[r.seq_id].matcher
                    if r.sampling is not None and r.sampling.constrained else None
                    for r in sched.rows]
        if self.grammars is not None and any(m is not None for m in matchers):
            self.grammars.fill_masks(out, matchers)

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free_seq(seq)
        self._release_history_slot(seq)
        if seq.pool is not None:  # its prompt is computed again from the start
            seq.pool = PoolAccumulator()
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update_from_output(self, sched: SchedulerOutput,
                           result: RunnerOutput) -> list[SeqOutput]:
        """Apply one step's results; returns what each sequence produced (see the module
        docstring). ``result.rows`` must line up with ``sched.rows``."""
        outs: list[SeqOutput] = []
        for row, res in zip(sched.rows, result.rows, strict=True):
            seq = self.seqs[row.seq_id]
            spec = seq.spec
            seq.num_computed += row.num_tokens
            self.kv.commit(seq)
            if seq.pool is not None:
                if res.pooled is not None:
                    seq.pool.add(res.pooled)
                if seq.num_computed == seq.prompt_len:
                    outs.append(SeqOutput(spec.request_id, 0, finish_reason="stop",
                                          num_cached_tokens=seq.num_cached_tokens,
                                          pooled=seq.pool.result(spec)))
                    self.finish_sequence(seq)
                continue
            if row.sampling is None or res.sampled is None:
                if res.prompt_logprobs:
                    outs.append(SeqOutput(spec.request_id, seq.index,
                                          prompt_logprobs=res.prompt_logprobs))
                continue
            tok = res.sampled.token_id
            seq.tokens.append(tok)
            self.num_generated += 1
            finish, stop_reason = self._stop(seq, tok)
            m = seq.matcher
            if m is not None and finish != "stop" and (m.is_error() or not m.consume(tok)):
                finish, stop_reason = "error", None  # this sequence only, never the engine
            p = row.sampling.params
            outs.append(SeqOutput(
                spec.request_id, seq.index, (tok,),
                logprobs=(res.sampled,) if p.logprobs is not None else (),
                prompt_logprobs=res.prompt_logprobs, finish_reason=finish,
                stop_reason=stop_reason, num_cached_tokens=seq.num_cached_tokens))
            if finish is not None:
                self.finish_sequence(seq)
        return outs

    def _stop(self, seq: Sequence, tok: int) -> tuple[str | None, int | None]:
        """The stop checks that need no text: stop ids and EOS (after min_tokens), length."""
        spec = seq.spec
        p = spec.sampling
        assert p is not None
        if seq.matcher is not None and seq.matcher.is_stopped() and tok in spec.eos_ids:
            return "stop", None  # the grammar is complete; EOS was all it allowed
        if seq.num_output >= p.min_tokens:
            if tok in p.stop_token_ids:
                return "stop", tok
            if not p.ignore_eos and tok in spec.eos_ids:
                return "stop", None
        if seq.num_output >= spec.max_tokens or len(seq.tokens) >= self.cfg.max_model_len:
            return "length", None
        return None, None
