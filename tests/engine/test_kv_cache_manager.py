"""KV page manager: allocation, reference counts, prefix reuse, eviction, no leaks."""

from __future__ import annotations

import random

from serving.engine.kv_cache_manager import KVCacheManager
from serving.engine.request import EngineRequest, Request, Sequence
from serving.engine.sampling_params import SamplingParams


def make_seq(tokens: list[int], rid: str = "r", salt: str = "") -> Sequence:
    req = Request(EngineRequest(rid, tuple(tokens), 0.0, sampling=SamplingParams(),
                                max_tokens=16, cache_salt=salt))
    seq = Sequence(0, req, 0, list(tokens))
    req.seqs.append(seq)
    return seq


def test_allocate_and_free_restore_every_page() -> None:
    kv = KVCacheManager(num_pages=9, page_size=4, enable_prefix_caching=False)
    a, b = make_seq(list(range(10)), "a"), make_seq(list(range(5)), "b")
    assert kv.allocate(a, 10) and len(a.pages) == 3
    assert kv.allocate(b, 5) and len(b.pages) == 2
    assert kv.num_free == 3 and 0 not in a.pages + b.pages
    assert not kv.allocate(b, 30)  # would need 8 pages; nothing changes
    assert len(b.pages) == 2 and kv.num_free == 3
    kv.free_seq(a)
    kv.free_seq(b)
    assert kv.num_free == 8
    kv.check()


def test_prefix_reuse_shares_pages_and_counts_hits() -> None:
    kv = KVCacheManager(num_pages=16, page_size=4, enable_prefix_caching=True)
    a = make_seq(list(range(13)), "a")
    assert kv.match_prefix(a) == 0
    kv.allocate(a, 13)
    a.num_computed = 13
    kv.commit(a)
    assert a.num_hashed_pages == 3
    b = make_seq([*list(range(12)), 99, 98], "b")
    assert kv.match_prefix(b) == 12
    assert b.pages == a.pages[:3]
    assert all(kv.ref[p] == 2 for p in b.pages)
    # A different prefix diverging in page 2 reuses only the first two pages.
    c = make_seq([*list(range(8)), 7, 7, 7, 7, 7], "c")
    assert kv.match_prefix(c) == 8
    assert kv.prefix_hits == 20 and kv.prefix_queries == 13 + 14 + 13
    for s in (a, b, c):
        kv.free_seq(s)
    kv.check()
    assert kv.num_free == 15
    # Freed hashed pages stay reusable until evicted.
    d = make_seq(list(range(13)), "d")
    assert kv.match_prefix(d) == 12
    kv.free_seq(d)


def test_match_leaves_one_token_to_compute() -> None:
    kv = KVCacheManager(num_pages=8, page_size=4, enable_prefix_caching=True)
    a = make_seq(list(range(8)))
    kv.allocate(a, 8)
    a.num_computed = 8
    kv.commit(a)
    b = make_seq(list(range(8)), "b")
    assert kv.match_prefix(b) == 4  # the last page is recomputed so logits exist


def test_salted_namespaces_do_not_share() -> None:
    kv = KVCacheManager(num_pages=8, page_size=4, enable_prefix_caching=True)
    a = make_seq(list(range(9)), "a", salt="tenant-1")
    kv.allocate(a, 9)
    a.num_computed = 9
    kv.commit(a)
    assert kv.match_prefix(make_seq(list(range(9)), "b", salt="tenant-2")) == 0


def test_eviction_lru_under_pressure() -> None:
    kv = KVCacheManager(num_pages=5, page_size=2, enable_prefix_caching=True)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8])
    assert kv.allocate(a, 8)
    a.num_computed = 8
    kv.commit(a)
    kv.free_seq(a)
    assert len(kv.evictable) == 4 and kv.num_free == 4
    b = make_seq([10, 11, 12, 13, 14], "b")
    assert kv.allocate(b, 5)  # needs 3 pages: evicts, tail pages first
    kv.check()
    assert len(kv.evictable) == 1
    c = make_seq([1, 2, 3], "c")
    assert kv.match_prefix(c) == 2  # page holding [1, 2] was the last to be evicted


def test_random_stress_never_leaks() -> None:
    rng = random.Random(0)
    kv = KVCacheManager(num_pages=40, page_size=4, enable_prefix_caching=True)
    live: list[Sequence] = []
    for i in range(2000):
        if live and rng.random() < 0.4:
            kv.free_seq(live.pop(rng.randrange(len(live))))
        else:
            toks = [rng.randrange(5) for _ in range(rng.randrange(1, 30))]
            s = make_seq(toks, f"s{i}")
            kv.match_prefix(s)
            if kv.allocate(s, len(toks)):
                s.num_computed = len(toks)
                kv.commit(s)
                live.append(s)
            else:
                kv.free_seq(s)
        if i % 100 == 0:
            kv.check()
    for s in live:
        kv.free_seq(s)
    kv.check()
    assert kv.num_free == 39
