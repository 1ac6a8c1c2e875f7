"""The CPU key-page layout (``dim_major_keys=True``) against the canonical reference.

The CPU backend stores each key page ``[H, B]`` instead of ``[B, H]`` (ops.attention docstring);
the canonical layout is the spec every kernel is tested against. These tests pin the two
together on the shared adversarial cases: all-NaN caches outside each sequence's filled slots,
permuted pages, NaN padding queries, mixed prefill/decode, GQA, soft-cap and sliding window.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from ops import attention
from tests.ops.paged_cases import SCENARIOS, Geometry, assert_matches_reference, build_case


def test_keys_dim_major_is_a_per_page_transpose() -> None:
    k_cache = jnp.arange(2 * 3 * 4 * 5, dtype=jnp.float32).reshape(2, 3, 4, 5)  # K P B H
    out = attention.keys_dim_major(k_cache)
    assert out.shape == k_cache.shape
    np.testing.assert_array_equal(np.asarray(out).reshape(2, 3, 5, 4),
                                  np.asarray(k_cache).transpose(0, 1, 3, 2))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("extra", [{}, {"soft_cap": 30.0}, {"sliding_window": 20}],
                         ids=["plain", "softcap", "window"])
def test_dim_major_keys_match_canonical(scenario: str, dtype: object, extra: dict) -> None:
    geo = Geometry.fitting(SCENARIOS, num_kv=2, group=3, head=64, page=16, dtype=dtype)
    case = build_case(geo, SCENARIOS[scenario], seed=3)
    kw = dict(sm_scale=0.125, **extra)
    want = attention.ragged_paged_attention_reference(*case.args, **kw)
    got = attention.ragged_paged_attention_reference(
        case.q, attention.keys_dim_major(case.k_cache), case.v_cache, case.page_table,
        case.kv_lens, case.cu_q_lens, dim_major_keys=True, **kw)
    assert_matches_reference(got, want, case, f"dim-major keys, {scenario} {extra}")
    # Same products summed in the same order: f32 agrees far inside the kernel tolerance.
    if dtype == jnp.float32:
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("page, tokens", [(16, 11), (8, 11), (16, 1), (16, 2)])
def test_dim_major_write_kv_matches_canonical(page: int, tokens: int) -> None:
    """Both layouts, both write paths (T=1 takes a scalar scatter, T>1 a row scatter)."""
    rng = np.random.default_rng(0)
    num_kv, pages, head = 3, 6, 64
    k_cache = jnp.asarray(rng.standard_normal((num_kv, pages, page, head)), jnp.float32)
    v_cache = jnp.asarray(rng.standard_normal((num_kv, pages, page, head)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((tokens, num_kv, head)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((tokens, num_kv, head)), jnp.float32)
    slots = rng.choice(np.arange(page, pages * page), size=tokens, replace=False).astype(np.int32)
    slots[[2, 7] if tokens > 2 else [tokens - 1]] = -1  # padding rows: dropped, nothing written
    if tokens == 1:  # one real write and one dropped one
        for single in (slots.copy(), np.array([page + 5], np.int32)):
            wk, wv = attention.write_kv(k_cache, v_cache, k, v, jnp.asarray(single))
            gk, gv = attention.write_kv(attention.keys_dim_major(k_cache), v_cache, k, v,
                                        jnp.asarray(single), dim_major_keys=True)
            np.testing.assert_array_equal(np.asarray(gk), np.asarray(attention.keys_dim_major(wk)))
            np.testing.assert_array_equal(np.asarray(gv), np.asarray(wv))
        np.testing.assert_array_equal(np.asarray(wv[:, 1, 5]), np.asarray(v[0]))
        return
    want_k, want_v = attention.write_kv(k_cache, v_cache, k, v, jnp.asarray(slots))
    got_k, got_v = attention.write_kv(attention.keys_dim_major(k_cache), v_cache, k, v,
                                      jnp.asarray(slots), dim_major_keys=True)
    np.testing.assert_array_equal(np.asarray(got_k), np.asarray(attention.keys_dim_major(want_k)))
    np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v))
    # And the write really landed where attention reads it: the slot's key, read back.
    got_pages = np.asarray(got_k).reshape(num_kv, pages, head, page)
    for t, slot in enumerate(slots):
        if slot >= 0:
            np.testing.assert_array_equal(got_pages[:, slot // page, :, slot % page],
                                          np.asarray(k[t]))
