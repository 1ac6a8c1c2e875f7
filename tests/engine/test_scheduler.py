"""Scheduler with fabricated runner outputs: budget, chunking, preemption order, abort, reuse."""

from __future__ import annotations

from serving.engine.kv_cache_manager import KVCacheManager
from serving.engine.request import Request, SeqStatus, Sequence
from serving.engine.sampling_params import SamplingParams
from serving.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput


def make(rid: str, prompt_len: int, n: int = 1, first: int = 0) -> Request:
    toks = [first + i for i in range(prompt_len)]
    req = Request(rid, toks, SamplingParams(n=n), 0, 0.0, frozenset(), 100)
    req.seqs = [Sequence(req, i, list(toks)) for i in range(n)]
    return req


def fake_step(sched: Scheduler, out: SchedulerOutput, token: int = 7) -> None:
    """What the engine does after the runner returns: advance, commit pages, append samples."""
    for c in out.chunks:
        c.seq.num_computed += c.num_tokens
        sched.kv.commit(c.seq)
        if c.sample:
            c.seq.tokens.append(token)


def setup(pages: int = 64, budget: int = 32, seqs: int = 4, ps: int = 4) -> Scheduler:
    kv = KVCacheManager(pages, ps, enable_prefix_caching=True)
    return Scheduler(SchedulerConfig(seqs, budget, 512), kv)


def test_token_budget_and_chunked_prefill() -> None:
    s = setup(budget=16)
    a, b = make("a", 20), make("b", 6, first=100)
    s.add(a.seqs[0])
    s.add(b.seqs[0])
    out = s.schedule()
    assert [(c.seq.request.request_id, c.num_tokens, c.sample) for c in out.chunks] == [
        ("a", 16, False)]
    fake_step(s, out)
    out = s.schedule()  # a finishes its prompt (4 tokens) and b's prompt fits after it
    assert [(c.seq.request.request_id, c.start, c.num_tokens, c.sample) for c in out.chunks] == [
        ("a", 16, 4, True), ("b", 0, 6, True)]
    fake_step(s, out)
    out = s.schedule()  # both decode one token each
    assert [c.num_tokens for c in out.chunks] == [1, 1]
    assert out.num_tokens == 2


def test_max_num_seqs_caps_running() -> None:
    s = setup(seqs=2)
    for i in range(3):
        s.add(make(f"r{i}", 3, first=10 * i).seqs[0])
    out = s.schedule()
    assert len(out.chunks) == 2 and len(s.waiting) == 1


def test_preemption_newest_first_and_recompute() -> None:
    s = setup(pages=7, budget=64, seqs=4, ps=4)  # 6 usable pages
    reqs = [make(f"r{i}", 8, first=10 * i) for i in range(3)]  # 2 pages each → pool full
    for r in reqs:
        s.add(r.seqs[0])
    out = s.schedule()
    assert len(out.chunks) == 3
    fake_step(s, out)  # each now holds 9 tokens: needs a third page to decode
    out = s.schedule()
    # r0 needs a page and none is free: the newest (r2) is preempted, which frees two pages,
    # enough for r0 and r1 to decode.
    assert [q.request.request_id for q in out.preempted] == ["r2"]
    assert [c.seq.request.request_id for c in out.chunks] == ["r0", "r1"]
    r2 = reqs[2].seqs[0]
    assert list(s.waiting) == [r2] and r2.num_computed == 0 and not r2.pages
    assert s.num_preemptions == 1
    fake_step(s, out)
    s.finish(reqs[0].seqs[0])
    out = s.schedule()  # r2 comes back and recomputes its prompt and its output token
    assert [(c.seq.request.request_id, c.num_tokens, c.sample) for c in out.chunks] == [
        ("r1", 1, True), ("r2", 9, True)]
    for c in out.chunks:
        s.finish(c.seq)
    s.kv.check()
    assert s.kv.num_free == 6


def test_abort_waiting_and_running_frees_pages() -> None:
    s = setup()
    a, b = make("a", 10), make("b", 10, first=50)
    s.add(a.seqs[0])
    out = s.schedule()
    fake_step(s, out)
    s.add(b.seqs[0])
    s.finish(a.seqs[0])  # running
    s.finish(b.seqs[0])  # waiting
    assert not s.has_work and a.seqs[0].status == SeqStatus.FINISHED
    s.kv.check()
    assert s.kv.num_used == 0


def test_prefix_cache_reuse_between_requests() -> None:
    s = setup()
    a = make("a", 13)
    s.add(a.seqs[0])
    fake_step(s, s.schedule())
    s.finish(a.seqs[0])
    b = make("b", 13)
    s.add(b.seqs[0])
    out = s.schedule()
    assert out.chunks[0].start == 12 and out.chunks[0].num_tokens == 1
    assert b.seqs[0].num_cached_tokens == 12


def test_n_samples_share_prompt_pages() -> None:
    s = setup()
    r = make("r", 10, n=3)
    for q in r.seqs:
        s.add(q)
    out = s.schedule()
    assert [c.seq.index for c in out.chunks] == [0]  # siblings wait for choice 0's prompt
    fake_step(s, out)
    out = s.schedule()
    assert sorted(c.seq.index for c in out.chunks) == [0, 1, 2]
    first = r.seqs[0].pages
    for q in r.seqs[1:]:
        assert q.pages[:2] == first[:2]  # two full prompt pages shared, the tail recomputed
    assert all(s.kv.ref[p] == 3 for p in first[:2])
