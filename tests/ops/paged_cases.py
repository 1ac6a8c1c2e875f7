"""Adversarial ragged paged-attention cases shared by the kernel tests.

Every case is built so that a kernel that reads out of bounds produces NaN:
- the caches start as all-NaN; only slots ``[0, kv_len)`` of each sequence's own pages are
  filled, so unused pages, the null page 0, and slots past the length of a sequence's last
  page stay NaN;
- page ids are a random permutation (no locality a kernel could accidentally rely on);
- padding tokens' queries are NaN too (their output must still be exactly 0);
- optionally (``oob_table``) the page-table entries past each sequence's pages point far outside
  the cache instead of at page 0, so a kernel that reads them indexes out of bounds.
Lengths are data, not shapes: all scenarios of one ``Geometry`` share one compiled kernel.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

# Per-dtype tolerances (atol = rtol) against the f32-accumulating reference. bf16: the kernels
# round the softmax weights to bf16 before the value product (as flash attention does) and the
# output is bf16.
TOLERANCES = {
    jnp.dtype(jnp.float32): 1e-4,
    jnp.dtype(jnp.bfloat16): 2e-2,
}

# (q_len, kv_len) per sequence; kv_len counts this step's tokens (the last q_len positions).
SCENARIOS: dict[str, list[tuple[int, int]]] = {
    "all_decode": [(1, 1), (1, 3), (1, 17), (1, 255), (1, 513), (1, 2), (1, 31)],
    "all_prefill": [(17, 17), (3, 3), (1, 1), (13, 13), (5, 5)],
    "mixed": [(1, 513), (13, 13), (1, 2), (7, 255), (1, 17), (5, 40), (9, 9)],
}
# Small enough for TPU interpret mode (slow to compile, every DMA is simulated).
SMALL_SCENARIOS: dict[str, list[tuple[int, int]]] = {
    "all_decode": [(1, 1), (1, 3), (1, 17), (1, 67)],
    "all_prefill": [(5, 5), (3, 3), (1, 1)],
    "mixed": [(1, 67), (5, 5), (3, 40), (2, 2)],
}


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Padded (compiled) shapes shared by a family of scenarios."""

    num_kv: int
    group: int
    head: int
    page: int
    dtype: object
    num_tokens: int
    num_seqs: int
    width: int
    num_pages: int

    @classmethod
    def fitting(cls, scenarios: dict[str, list[tuple[int, int]]], *, num_kv: int, group: int,
                head: int, page: int, dtype: object, spare_pages: int = 5) -> Geometry:
        """The smallest padded shapes that hold every scenario, with one padded sequence and
        some padding tokens, so padding paths always run."""
        seqs = list(scenarios.values())
        tokens = max(sum(q for q, _ in s) for s in seqs)
        pages = max(sum(-(-kv // page) for _, kv in s) for s in seqs)
        width = max(-(-kv // page) for s in seqs for _, kv in s)
        return cls(num_kv=num_kv, group=group, head=head, page=page, dtype=dtype,
                   num_tokens=tokens + 3, num_seqs=max(len(s) for s in seqs) + 1,
                   width=width + 2, num_pages=1 + pages + spare_pages)


@dataclasses.dataclass(frozen=True)
class Case:
    q: jax.Array  # [T, N, H]
    k_cache: jax.Array  # [K, P, B, H]
    v_cache: jax.Array
    page_table: jax.Array  # i32[S, W]
    kv_lens: jax.Array  # i32[S]
    cu_q_lens: jax.Array  # i32[S + 1]
    num_real: int  # real tokens; rows past it are padding

    @property
    def args(self) -> tuple[jax.Array, ...]:
        return (self.q, self.k_cache, self.v_cache, self.page_table, self.kv_lens,
                self.cu_q_lens)


def build_case(geo: Geometry, seqs: list[tuple[int, int]], *, seed: int = 0,
               oob_table: bool = False) -> Case:
    rng = np.random.default_rng(seed)
    k, g, h, b = geo.num_kv, geo.group, geo.head, geo.page
    assert len(seqs) < geo.num_seqs + 1 and sum(q for q, _ in seqs) <= geo.num_tokens
    k_cache = np.full((k, geo.num_pages, b, h), np.nan, np.float32)
    v_cache = np.full_like(k_cache, np.nan)
    fill = 1_000_000 if oob_table else 0
    page_table = np.full((geo.num_seqs, geo.width), fill, np.int32)
    if oob_table:
        page_table += np.arange(geo.num_seqs * geo.width, dtype=np.int32).reshape(page_table.shape)
    kv_lens = np.zeros(geo.num_seqs, np.int32)
    cu_q_lens = np.zeros(geo.num_seqs + 1, np.int32)
    free = rng.permutation(np.arange(1, geo.num_pages)).astype(np.int32)  # page 0 is null
    used = 0
    for s, (q_len, kv_len) in enumerate(seqs):
        assert 1 <= q_len <= kv_len
        n = -(-kv_len // b)
        pages = free[used:used + n]
        used += n
        page_table[s, :n] = pages
        for i, p in enumerate(pages):
            filled = min(b, kv_len - i * b)
            k_cache[:, p, :filled] = rng.standard_normal((k, filled, h))
            v_cache[:, p, :filled] = rng.standard_normal((k, filled, h))
        kv_lens[s] = kv_len
        cu_q_lens[s + 1] = cu_q_lens[s] + q_len
    cu_q_lens[len(seqs) + 1:] = cu_q_lens[len(seqs)]
    num_real = int(cu_q_lens[-1])
    q = rng.standard_normal((geo.num_tokens, k * g, h)).astype(np.float32)
    q[num_real:] = np.nan
    dt = geo.dtype
    return Case(jnp.asarray(q, dt), jnp.asarray(k_cache, dt), jnp.asarray(v_cache, dt),
                jnp.asarray(page_table), jnp.asarray(kv_lens), jnp.asarray(cu_q_lens), num_real)


def assert_matches_reference(out: jax.Array, ref: jax.Array, case: Case, label: str) -> None:
    """No NaN anywhere (an out-of-bounds read or an unwritten row), padding rows exactly 0,
    real rows within the dtype's tolerance of the reference."""
    out_np = np.asarray(out.astype(jnp.float32))
    ref_np = np.asarray(ref.astype(jnp.float32))
    assert out.shape == ref.shape and out.dtype == ref.dtype, label
    assert not np.isnan(ref_np).any(), f"{label}: the reference itself produced NaN"
    bad = np.isnan(out_np)
    assert not bad.any(), (
        f"{label}: NaN in {int(bad.any(axis=(1, 2)).sum())} token rows "
        f"(first {np.argwhere(bad.any(axis=(1, 2)))[:5, 0].tolist()}): out-of-bounds read or "
        "unwritten output")
    assert (out_np[case.num_real:] == 0).all(), f"{label}: padding rows are not zero"
    tol = TOLERANCES[jnp.dtype(out.dtype)]
    np.testing.assert_allclose(out_np, ref_np, atol=tol, rtol=tol, err_msg=label)
