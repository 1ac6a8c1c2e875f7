"""Continuous-batching scheduler: token budget, chunked prefill, recompute preemption. No JAX.

``schedule()`` is called once per engine step and returns a ``SchedulerOutput``: which sequences
run this step and how many of their tokens. Running sequences go first (in admission order), each
taking min(remaining tokens, budget), so decodes and prompt chunks share one step; then waiting
sequences are admitted while budget, ``max_num_seqs`` and free pages allow. When a running sequence
needs a page and none is free, the newest running sequence is preempted: its pages are freed and it
goes back to the front of the queue to be recomputed later (its tokens are kept). The engine
calls ``finish``/``abort`` to release a sequence; pages never leak (see KVCacheManager.check).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from serving.engine.kv_cache_manager import KVCacheManager
from serving.engine.request import SeqStatus, Sequence


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be at least max_num_seqs")


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # first token position computed this step (== seq.num_computed before the step)
    num_tokens: int  # tokens computed this step
    sample: bool  # this chunk ends at the last known token, so a new token is sampled


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, kv: KVCacheManager) -> None:
        self.cfg = cfg
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.cfg.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(len(seq.tokens) - seq.num_computed, budget)
            while not self.kv.allocate(seq, seq.num_computed + n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.chunks.append(self._chunk(seq, n))
                budget -= n
                i += 1
                continue
            break  # seq itself was preempted: nothing after it is left to schedule
        if out.preempted:
            return out
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting.popleft()
            if not seq.ready:
                skipped.append(seq)
                continue
            # Prompt logprobs need every prompt position computed, so choice 0 skips the cache.
            if seq.num_computed == 0 and not seq.pages and not (
                    seq.params.prompt_logprobs is not None and seq.index == 0):
                self.kv.match_prefix(seq)
            n = min(len(seq.tokens) - seq.num_computed, budget)
            if not self.kv.allocate(seq, seq.num_computed + n):
                self.kv.free_seq(seq)  # give back prefix hits; retry when pages free up
                self.waiting.appendleft(seq)
                break
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.chunks.append(self._chunk(seq, n))
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        return out

    def _chunk(self, seq: Sequence, n: int) -> ScheduledChunk:
        return ScheduledChunk(seq, seq.num_computed, n, seq.num_computed + n == len(seq.tokens))

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free_seq(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence wherever it is."""
        if seq.status == SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free_seq(seq)
        seq.status = SeqStatus.FINISHED
