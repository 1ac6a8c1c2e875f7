"""Scheduler with fabricated runner outputs: budget, chunking, preemption order, abort, reuse,
and its own update (progress, commits, stop checks) with no engine around it."""

from __future__ import annotations

import numpy as np
import pytest

from models.pooling import PoolingType
from serving.engine.kv_cache_manager import KVCacheManager
from serving.engine.pooling_params import PoolingParams
from serving.engine.records import (
    PooledChunk,
    RowResult,
    RunnerOutput,
    SampledToken,
    SchedulerOutput,
)
from serving.engine.request import EngineRequest
from serving.engine.sampling_params import SamplingParams
from serving.engine.scheduler import Scheduler, SchedulerConfig

PoolParamsMean = PoolingParams()


def make(s: Scheduler, rid: str, prompt_len: int, n: int = 1, first: int = 0,
         **params: object) -> None:
    p = SamplingParams(n=n, **params)  # type: ignore[arg-type]
    s.add(EngineRequest(rid, tuple(first + i for i in range(prompt_len)), 0.0, sampling=p,
                        max_tokens=p.max_tokens or 100, eos_ids=frozenset({99})))


def step(sched: Scheduler, out: SchedulerOutput, token: int = 7) -> list:
    """What the runner would return: ``token`` for every row that samples."""
    res = RunnerOutput(tuple(RowResult(SampledToken(token) if r.sampling else None)
                             for r in out.rows))
    return sched.update_from_output(out, res)


def rid(s: Scheduler, out: SchedulerOutput) -> list[str]:
    return [s.seqs[r.seq_id].spec.request_id for r in out.rows]


def setup(pages: int = 64, budget: int = 32, seqs: int = 4, ps: int = 4) -> Scheduler:
    kv = KVCacheManager(pages, ps, enable_prefix_caching=True)
    return Scheduler(SchedulerConfig(seqs, budget, 512), kv)


def test_token_budget_and_chunked_prefill() -> None:
    s = setup(budget=16)
    make(s, "a", 20)
    make(s, "b", 6, first=100)
    out = s.schedule()
    assert [(rid(s, out)[i], r.num_tokens, r.sampling is not None)
            for i, r in enumerate(out.rows)] == [("a", 16, False)]
    step(s, out)
    out = s.schedule()  # a finishes its prompt (4 tokens) and b's prompt fits after it
    assert [(r.start, r.num_tokens, r.sampling is not None) for r in out.rows] == [
        (16, 4, True), (0, 6, True)]
    assert rid(s, out) == ["a", "b"]
    step(s, out)
    out = s.schedule()  # both decode one token each
    assert [r.num_tokens for r in out.rows] == [1, 1]
    assert out.num_tokens == 2
    assert out.rows[0].token_ids == (7,)  # the token the update appended


def test_max_num_seqs_caps_running() -> None:
    s = setup(seqs=2)
    for i in range(3):
        make(s, f"r{i}", 3, first=10 * i)
    out = s.schedule()
    assert len(out.rows) == 2 and len(s.waiting) == 1


def test_preemption_newest_first_and_recompute() -> None:
    s = setup(pages=7, budget=64, seqs=4, ps=4)  # 6 usable pages
    for i in range(3):
        make(s, f"r{i}", 8, first=10 * i)  # 2 pages each → pool full
    out = s.schedule()
    assert len(out.rows) == 3
    step(s, out)  # each now holds 9 tokens: needs a third page to decode
    out = s.schedule()
    # r0 needs a page and none is free: the newest (r2) is preempted, which frees two pages,
    # enough for r0 and r1 to decode.
    r2 = s.requests["r2"].seqs[0]
    assert out.preempted == (r2.seq_id,)
    assert rid(s, out) == ["r0", "r1"]
    assert list(s.waiting) == [r2] and r2.num_computed == 0 and not r2.pages
    assert s.num_preemptions == 1
    step(s, out)
    s.abort("r0")
    out = s.schedule()  # r2 comes back and recomputes its prompt and its output token
    assert [(rid(s, out)[i], r.num_tokens, r.sampling is not None)
            for i, r in enumerate(out.rows)] == [("r1", 1, True), ("r2", 9, True)]
    s.abort("r1")
    s.abort("r2")
    s.kv.check()
    assert s.kv.num_free == 6


def test_abort_waiting_and_running_frees_pages() -> None:
    s = setup()
    make(s, "a", 10)
    step(s, s.schedule())
    make(s, "b", 10, first=50)
    outs = s.abort("a") + s.abort("b")  # running, then waiting
    assert [(o.request_id, o.finish_reason) for o in outs] == [("a", "abort"), ("b", "abort")]
    assert not s.has_work and not s.requests and not s.seqs
    s.kv.check()
    assert s.kv.num_used == 0
    assert s.abort("a") == []  # unknown now


def test_prefix_cache_reuse_between_requests() -> None:
    s = setup()
    make(s, "a", 13)
    step(s, s.schedule())
    s.abort("a")
    make(s, "b", 13)
    out = s.schedule()
    assert out.rows[0].start == 12 and out.rows[0].num_tokens == 1
    assert s.requests["b"].seqs[0].num_cached_tokens == 12


def test_n_samples_share_prompt_pages() -> None:
    s = setup()
    make(s, "r", 10, n=3)
    out = s.schedule()
    seqs = s.requests["r"].seqs
    assert [s.seqs[r.seq_id].index for r in out.rows] == [0]  # siblings wait for choice 0
    step(s, out)
    out = s.schedule()
    assert sorted(s.seqs[r.seq_id].index for r in out.rows) == [0, 1, 2]
    first = seqs[0].pages
    for q in seqs[1:]:
        assert q.pages[:2] == first[:2]  # two full prompt pages shared, the tail recomputed
    assert all(s.kv.ref[p] == 3 for p in first[:2])


def test_update_applies_stop_checks() -> None:
    """Stop token ids and EOS finish a choice (after min_tokens), length caps it; finished
    sequences release their pages and leave the scheduler."""
    s = setup()
    make(s, "stop", 4, stop_token_ids=[5])
    make(s, "eos", 4, first=20, min_tokens=2)
    make(s, "len", 4, first=40, max_tokens=2, ignore_eos=True)
    out = s.schedule()
    outs = step(s, out, token=5)
    by = {o.request_id: o for o in outs}
    assert (by["stop"].finish_reason, by["stop"].stop_reason) == ("stop", 5)
    assert by["eos"].finish_reason is None and by["len"].finish_reason is None
    outs = step(s, s.schedule(), token=99)  # EOS: "eos" is past min_tokens now
    by = {o.request_id: o for o in outs}
    assert by["eos"].finish_reason == "stop" and by["eos"].stop_reason is None
    assert by["len"].finish_reason == "length"  # ignore_eos: EOS is just a token
    assert not s.requests and not s.has_work
    s.kv.check()
    assert s.kv.num_used == 0


def test_max_tokens_and_min_tokens_bans() -> None:
    s = setup()
    make(s, "m", 4, min_tokens=2, stop_token_ids=[3], max_tokens=3)
    out = s.schedule()
    assert out.rows[0].sampling is not None
    assert out.rows[0].sampling.banned == (3, 99)  # stop ids and EOS while below min_tokens
    outs = step(s, out, token=3)  # a banned id is never drawn; if it were, no stop yet
    assert outs[0].finish_reason is None
    step(s, s.schedule(), token=8)
    out = s.schedule()
    assert out.rows[0].sampling is not None and out.rows[0].sampling.banned == ()
    assert step(s, out, token=8)[0].finish_reason == "length"  # max_tokens=3 reached


def test_rows_carry_values_not_live_sequences() -> None:
    """The runner sees frozen copies: mutating the scheduler's state after schedule() does not
    change a row already handed out."""
    s = setup()
    make(s, "a", 6, temperature=0.5, seed=3)
    out = s.schedule()
    row = out.rows[0]
    seq = s.seqs[row.seq_id]
    seq.tokens.append(123)
    assert row.token_ids == (0, 1, 2, 3, 4, 5) and 123 not in row.token_ids
    with pytest.raises(AttributeError):
        row.start = 3  # type: ignore[misc]


def test_pooling_request_finishes_with_its_result() -> None:
    s = setup(budget=4)
    s.add(EngineRequest("p", (1, 2, 3, 4, 5, 6), 0.0, pooling=PoolingParams(),
                        full_prompt=True))
    chunk = np.ones(3, np.float32)
    outs = []
    while s.has_work:
        out = s.schedule()
        assert all(r.sampling is None and r.pooling is not None for r in out.rows)
        res = RunnerOutput(tuple(RowResult(pooled=PooledChunk(chunk, chunk, chunk * r.num_tokens))
                                 for r in out.rows))
        outs += s.update_from_output(out, res)
    assert len(outs) == 1 and outs[0].pooled is not None
    np.testing.assert_allclose(outs[0].pooled, chunk)  # the mean over two chunks of 4 and 2
    assert outs[0].finish_reason == "stop" and not s.requests
    s.kv.check()


def test_preempted_pooling_prompt_pools_only_its_recomputed_chunks() -> None:
    """A pooling prompt preempted half way is computed again from the start: what its first
    chunks contributed before the preemption must not count twice."""
    s = setup(pages=5, budget=4, seqs=2, ps=4)  # 4 usable pages
    s.add(EngineRequest("p", tuple(range(12)), 0.0, pooling=PoolParamsMean, full_prompt=True,
                        pooling_type=PoolingType.MEAN))
    seq = s.requests["p"].seqs[0]

    def run(out: SchedulerOutput) -> list:
        res = RunnerOutput(tuple(RowResult(pooled=PooledChunk(ones, ones, ones * r.num_tokens))
                                 for r in out.rows))
        return s.update_from_output(out, res)

    ones = np.ones(2, np.float32)
    run(s.schedule())  # 4 of 12 prompt tokens
    assert seq.num_computed == 4 and seq.pool is not None and seq.pool.total is not None
    s._preempt(s.running.pop())  # as schedule() does when a page is short
    assert seq.pool.total is None and seq.num_computed == 0
    outs = []
    while s.has_work:
        outs += run(s.schedule())
    np.testing.assert_allclose(outs[0].pooled, ones)  # 12 tokens summed once, / 12
