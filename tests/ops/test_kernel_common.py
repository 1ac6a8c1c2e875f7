"""The query-block schedule shared by the kernels: every token has exactly one owner block."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from ops.kernel_common import build_q_blocks, num_q_blocks, token_rows


def _random_layout(rng: np.random.Generator, num_tokens: int, num_seqs: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Ragged q lengths (some 0, all-decode or long prefill runs) that fit the padded shape."""
    live = rng.integers(1, num_seqs + 1)
    q_lens = np.zeros(num_seqs, np.int32)
    budget = int(rng.integers(live, num_tokens + 1))
    q_lens[:live] = 1
    for _ in range(budget - live):
        q_lens[rng.integers(0, live)] += 1
    if rng.random() < 0.3:
        q_lens[rng.integers(0, live)] = 0  # a zero-length sequence in the middle
    kv_lens = np.where(q_lens > 0, q_lens + rng.integers(0, 300, num_seqs), 0).astype(np.int32)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    return cu, kv_lens


@pytest.mark.parametrize("block_q", [1, 2, 3, 8, 16])
def test_schedule_covers_every_token_once(block_q: int) -> None:
    rng = np.random.default_rng(block_q)
    num_tokens, num_seqs = 40, 7
    build = jax.jit(build_q_blocks, static_argnums=(2, 3))
    rows_of = jax.jit(token_rows, static_argnums=(2, 3))
    for _ in range(25):
        cu, kv = _random_layout(rng, num_tokens, num_seqs)
        blocks = jax.tree.map(np.asarray, build(cu, kv, num_tokens, block_q))
        assert blocks.seq.shape == (num_q_blocks(num_tokens, num_seqs, block_q),)
        owner = np.full(num_tokens, -1)
        for b in range(blocks.seq.shape[0]):
            assert 0 <= blocks.rows[b] <= block_q
            for r in range(blocks.rows[b]):
                t = blocks.tok0[b] + r
                assert owner[t] == -1, f"token {t} owned twice"
                owner[t] = b
                s = blocks.seq[b]
                if t < cu[-1]:  # a real token: its block carries its sequence's metadata
                    assert cu[s] <= t < cu[s + 1]
                    assert blocks.kv_len[b] == kv[s]
                    assert blocks.pos0[b] + r == kv[s] - (cu[s + 1] - cu[s]) + (t - cu[s])
                else:  # padding: attends to nothing
                    assert blocks.kv_len[b] == 0
        assert (owner >= 0).all(), "some token has no block"
        blk, row = (np.asarray(a) for a in rows_of(cu, kv, num_tokens, block_q))
        np.testing.assert_array_equal(blk, owner)
        np.testing.assert_array_equal(blocks.tok0[blk] + row, np.arange(num_tokens))
