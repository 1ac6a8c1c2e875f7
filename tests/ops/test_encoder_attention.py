"""The encoder (bidirectional) attention against a dense per-sequence reference.

Ragged packs that cross tile boundaries, sequences longer than a tile, empty sequence rows,
token counts that are not whole tiles, grouped KV heads, and NaN in every padding row."""

import numpy as np
import pytest

from ops.attention import (
    encoder_attention_aligned,
    encoder_attention_banded,
    ragged_encoder_attention_reference,
)

PATHS = {"chosen": ragged_encoder_attention_reference, "aligned": encoder_attention_aligned,
         "banded": encoder_attention_banded}


def dense_reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, lens: list[int],
                    sm_scale: float) -> np.ndarray:
    """Softmax attention of each sequence over itself, one sequence at a time, in float64."""
    num_q, num_kv = q.shape[1], k.shape[1]
    out = np.zeros(q.shape, np.float64)
    at = 0
    for n in lens:
        if n == 0:
            continue
        qs, ks, vs = (x[at:at + n].astype(np.float64) for x in (q, k, v))
        ks = np.repeat(ks, num_q // num_kv, axis=1)  # [n, N, H]
        vs = np.repeat(vs, num_q // num_kv, axis=1)
        s = np.einsum("qnh,knh->nqk", qs, ks) * sm_scale
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[at:at + n] = np.einsum("nqk,knh->qnh", p, vs)
        at += n
    return out


CASES = {
    "one token": (8, [1]),
    "short seqs, many rows": (96, [3, 7, 1, 30, 2, 5, 9, 11, 4]),
    "crosses tiles": (128, [31, 33, 2, 40]),
    "longer than a tile": (160, [100, 5, 50]),
    "not whole tiles": (70, [20, 45]),
    "empty rows": (64, [0, 10, 0, 0, 17, 0]),
    "full bucket": (96, [32, 32, 32]),
    "many one-token seqs": (64, [1] * 40),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("tile", [32, 8])
@pytest.mark.parametrize("path", list(PATHS))
def test_matches_dense_per_sequence(path: str, name: str, tile: int) -> None:
    num_tokens, lens = CASES[name]
    rng = np.random.default_rng(len(name))
    num_q, num_kv, head = 4, 2, 16
    q = rng.standard_normal((num_tokens, num_q, head)).astype(np.float32)
    k = rng.standard_normal((num_tokens, num_kv, head)).astype(np.float32)
    v = rng.standard_normal((num_tokens, num_kv, head)).astype(np.float32)
    used = sum(lens)
    for x in (q, k, v):
        x[used:] = np.nan  # padding must not leak
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    if path != "chosen":
        tile = min(tile, num_tokens)  # what the public function hands its paths
    got = np.asarray(PATHS[path](q, k, v, cu, sm_scale=0.25, tile=tile))
    want = dense_reference(q, k, v, lens, 0.25)
    np.testing.assert_allclose(got[:used], want[:used], rtol=2e-5, atol=2e-5)
    assert np.all(got[used:] == 0.0)


@pytest.mark.parametrize("path", list(PATHS))
def test_sequences_do_not_see_each_other(path: str) -> None:
    """Changing one sequence's keys leaves its neighbours' outputs, in the same tiles, as they
    were (a mask that let keys cross a boundary fails here)."""
    attend = PATHS[path]
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((24, 2, 8)).astype(np.float32) for _ in range(3))
    cu = np.array([0, 5, 11, 18], np.int32)
    base = np.asarray(attend(q, k, v, cu, sm_scale=0.3, tile=8))
    k2, v2 = k.copy(), v.copy()
    k2[5:11] += 3.0
    v2[5:11] -= 2.0
    moved = np.asarray(attend(q, k2, v2, cu, sm_scale=0.3, tile=8))
    np.testing.assert_array_equal(moved[:5], base[:5])
    np.testing.assert_array_equal(moved[11:18], base[11:18])
    assert not np.allclose(moved[5:11], base[5:11])
