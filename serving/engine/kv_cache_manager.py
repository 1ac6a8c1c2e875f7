"""KV page manager: free list, reference counts, prefix cache. Pure Python, no JAX.

Called by the scheduler only. A model that keeps no KV cache (an encoder) gets a manager with
``num_pages=0``: every allocation succeeds with no pages and nothing is ever cached.

Invariants (checked by ``check``; ``audit`` is the server's cheap leak check):
- page 0 is the null page, never allocated, pinned with one reference;
- every other page is exactly one of: referenced (ref > 0), free (never hashed or its hash
  dropped), or evictable (ref == 0, still hashed, in LRU order);
- a hashed page holds the K/V of exactly the tokens its chained hash names, so any sequence whose
  token prefix hashes the same may reference it instead of recomputing.
Hashes chain a page's tokens onto the previous page's hash with SHA-256 (a collision would serve
someone else's K/V, so no 64-bit Python hash), salted per namespace.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque

import numpy as np

from serving.engine.request import Sequence


class KVCacheManager:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool) -> None:
        if num_pages == 1 or num_pages < 0:
            raise ValueError(f"num_pages must be 0 (no KV cache) or at least 2 (page 0 is the "
                             f"null page): {num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.has_cache = num_pages > 0
        self.enable_prefix_caching = enable_prefix_caching and self.has_cache
        self.ref = [0] * num_pages
        if self.has_cache:
            self.ref[0] = 1
        self.free: deque[int] = deque(range(1, num_pages))
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.page_hash: dict[int, bytes] = {}
        self.hash_page: dict[bytes, int] = {}
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # prompt tokens found

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.evictable)

    @property
    def num_usable(self) -> int:
        """Pages a sequence can ever hold (all but the null page)."""
        return max(self.num_pages - 1, 0)

    @property
    def num_used(self) -> int:
        return self.num_usable - self.num_free

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size) if self.has_cache else 0

    def _salt(self, seq: Sequence) -> bytes:
        salt = seq.spec.cache_salt if self.enable_prefix_caching else seq.spec.request_id
        return hashlib.sha256(("xlaserve:" + salt).encode()).digest()

    def _chain(self, prev: bytes, tokens: list[int]) -> bytes:
        return hashlib.sha256(prev + np.asarray(tokens, np.int64).tobytes()).digest()

    def _take(self) -> int:
        if self.free:
            page = self.free.popleft()
        else:
            page, _ = self.evictable.popitem(last=False)
            del self.hash_page[self.page_hash.pop(page)]
        self.ref[page] = 1
        return page

    def match_prefix(self, seq: Sequence) -> int:
        """Reference cached pages for the longest cached prefix of ``seq``; returns tokens hit.

        Leaves at least one token uncomputed, so the step that follows produces logits.
        """
        assert not seq.pages and seq.num_computed == 0
        ps = self.page_size
        max_pages = (len(seq.tokens) - 1) // ps
        prev = self._salt(seq)
        for i in range(max_pages):
            h = self._chain(prev, seq.tokens[i * ps:(i + 1) * ps])
            page = self.hash_page.get(h)
            if page is None:
                break
            if self.ref[page] == 0:
                del self.evictable[page]
            self.ref[page] += 1
            seq.pages.append(page)
            prev = h
        hit = len(seq.pages) * ps
        seq.num_computed = hit
        seq.num_hashed_pages = len(seq.pages)
        seq.last_hash = prev
        if seq.num_output == 0:
            self.prefix_queries += len(seq.tokens)
            self.prefix_hits += hit
            seq.num_cached_tokens = hit
        return hit

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Give ``seq`` pages for its first ``num_tokens`` tokens; False (no change) if short."""
        need = self.pages_for(num_tokens) - len(seq.pages)
        if need <= 0:
            return True
        if need > self.num_free:
            return False
        seq.pages.extend(self._take() for _ in range(need))
        return True

    def commit(self, seq: Sequence) -> None:
        """Register the hashes of pages that became full and computed (after a step)."""
        if not self.has_cache:
            return
        ps = self.page_size
        if seq.num_hashed_pages == 0:
            seq.last_hash = self._salt(seq)
        while seq.num_hashed_pages < seq.num_computed // ps:
            i = seq.num_hashed_pages
            h = self._chain(seq.last_hash, seq.tokens[i * ps:(i + 1) * ps])
            page = seq.pages[i]
            if h not in self.hash_page and page not in self.page_hash:
                self.hash_page[h] = page
                self.page_hash[page] = h
            seq.last_hash = h
            seq.num_hashed_pages += 1

    def free_seq(self, seq: Sequence) -> None:
        """Drop the sequence's references; its tail pages become the first to be evicted."""
        for page in reversed(seq.pages):
            self.ref[page] -= 1
            if self.ref[page] == 0:
                if page in self.page_hash:
                    self.evictable[page] = None
                else:
                    self.free.append(page)
        seq.pages = []
        seq.num_computed = 0
        seq.num_hashed_pages = 0
        seq.last_hash = b""

    @property
    def num_cached(self) -> int:
        """Pages no sequence references that still hold a cached prefix (evictable)."""
        return len(self.evictable)

    def audit(self, held: int) -> str | None:
        """The leak check: ``free + cached + held == usable``, where ``held`` is the number of
        distinct pages the live sequences own (counted by the caller from the sequences, not
        from reference counts, so a page referenced by nobody's sequence shows up). Returns
        what does not add up, or None."""
        free, cached = len(self.free), len(self.evictable)
        if free + cached + held == self.num_usable:
            return None
        return (f"{free} free + {cached} cached + {held} held by requests = "
                f"{free + cached + held} pages, but the pool has {self.num_usable}")

    def check(self) -> None:
        """Assert the invariants (tests and debug runs)."""
        if not self.has_cache:
            assert not self.free and not self.evictable and not self.page_hash
            return
        assert self.ref[0] >= 1
        free, evict = set(self.free), set(self.evictable)
        assert not free & evict and 0 not in free | evict
        for page in range(1, self.num_pages):
            in_use = self.ref[page] > 0
            assert in_use + (page in free) + (page in evict) == 1, page
            if page in evict:
                assert page in self.page_hash
        assert all(self.hash_page[h] == p for p, h in self.page_hash.items())
