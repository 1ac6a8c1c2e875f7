"""The on-device sampler against its definition, without a model.

- ``floors`` keeps exactly the token set that the definitions of min-p, top-k and top-p give
  (an independent float64 numpy reference), on the fast candidate path and on the exact
  bisection (top-k above ``CANDIDATES``, nuclei wider than it), with ties and banned tokens.
- Draws follow the distribution: chi-square against the softmax at temperature 1, and against
  the renormalised kept set with filters on; no token outside the set is ever drawn.
- The seed contract: a row draws the same tokens alone or among any neighbours, in any S bucket.
- ``argmax`` returns ``jnp.argmax``'s index.
- ``draw`` (the runner's common-step executable) gives ``sample``'s tokens, with ``lax.top_k`` and
  with the native top-k kernel, on every path (narrow, narrow by ``GUMBEL_REACH``, per-row exact).
- The Gumbel noise is finite and spans less than ``GUMBEL_REACH``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ops import native
from serving.engine.sampler import (
    CANDIDATES,
    GUMBEL_REACH,
    Sampling,
    SamplingFlags,
    _gumbel,
    _row_keys,
    argmax,
    candidates,
    draw,
    floors,
    masked_argmax,
    sample,
)
from tests.ops.native_host import native_available

BIAS_WIDTH = 4
HISTORY = 8
MASK_WIDTH = 49152 // 32  # words: wide enough for every vocabulary used here


def inputs(s: int, *, temperature: float | np.ndarray = 1.0, top_k: int | np.ndarray = 0,
           top_p: float | np.ndarray = 1.0, min_p: float | np.ndarray = 0.0,
           seeds: np.ndarray | None = None, counters: np.ndarray | None = None) -> Sampling:
    def row(x: float | np.ndarray, dtype: type) -> np.ndarray:
        return np.broadcast_to(np.asarray(x, dtype), (s,)).copy()

    temp, k, p, mp = (row(temperature, np.float32), row(top_k, np.int32), row(top_p, np.float32),
                      row(min_p, np.float32))
    flags = SamplingFlags(
        sample=np.asarray(bool((temp > 0).any())),
        filter=np.asarray(bool(((k > 0) | (p < 1) | (mp > 0)).any())),
        penalties=np.asarray(False), bias=np.asarray(False), logprobs=np.asarray(False),
        mask=np.asarray(False))
    return Sampling(
        temperature=temp, top_k=k, top_p=p, min_p=mp, presence=row(0, np.float32),
        frequency=row(0, np.float32), repetition=row(1, np.float32),
        seeds=row(7, np.uint32) if seeds is None else seeds.astype(np.uint32),
        counters=row(0, np.int32) if counters is None else counters.astype(np.int32),
        bias_ids=np.full((s, BIAS_WIDTH), -1, np.int32),
        bias_vals=np.zeros((s, BIAS_WIDTH), np.float32),
        history=np.full((s, HISTORY), -1, np.int32), prompt_lens=row(0, np.int32),
        mask=np.full((s, MASK_WIDTH), -1, np.int32), flags=flags)


def reference_kept(y: np.ndarray, top_k: int, top_p: float, min_p: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The kept set by definition, in float64: min-p and top-k (k-th largest value, ties kept)
    set a floor; top-p keeps a token when the mass strictly above its value, within the floor's
    set, is below top_p of that set's mass. Also returns how far each token's top-p test is from
    its boundary (relative), so that float32 ties at the boundary can be told apart."""
    y = y.astype(np.float64)
    v = y.shape[0]
    best = y.max()
    floor = -np.inf
    if min_p > 0:
        floor = best + np.log(min_p)
    if 0 < top_k < v:
        floor = max(floor, np.sort(y)[::-1][top_k - 1])
    keep = y >= floor
    margin = np.full(v, np.inf)
    if top_p < 1:
        w = np.where(keep, np.exp(y - best), 0.0)
        order = np.argsort(-y, kind="stable")
        sorted_y, sorted_w = y[order], w[order]
        above_sorted = np.cumsum(sorted_w) - sorted_w
        # the mass strictly above a value: that of the first token of its run of equal values
        first = np.searchsorted(-sorted_y, -sorted_y, side="left")
        above = np.empty(v)
        above[order] = above_sorted[first]
        budget = top_p * w.sum()
        keep &= above < budget
        margin = np.abs(above - budget) / w.sum()
    return keep, margin


def logits_cases(rng: np.random.Generator, v: int) -> dict[str, np.ndarray]:
    peaked = rng.standard_normal(v) * 2.0
    peaked[rng.integers(0, v, 5)] += 12.0
    flat = rng.standard_normal(v) * 0.3  # nuclei far wider than the candidates
    tied = np.round(rng.standard_normal(v) * 2.0, 1)  # many runs of equal values
    banned = rng.standard_normal(v) * 2.0
    banned[rng.integers(0, v, v // 3)] = -np.inf
    return {"peaked": peaked, "flat": flat, "tied": tied, "banned": banned}


FILTERS = [  # (top_k, top_p, min_p)
    (0, 0.95, 0.0), (0, 0.5, 0.0), (0, 0.999, 0.0), (50, 1.0, 0.0), (1, 1.0, 0.0),
    (CANDIDATES, 1.0, 0.0), (CANDIDATES + 1, 1.0, 0.0), (700, 1.0, 0.0), (0, 1.0, 0.05),
    (0, 1.0, 0.5), (50, 0.9, 0.05), (700, 0.9, 0.0), (3000, 0.99, 0.01), (0, 1.0, 0.0),
]


@pytest.mark.parametrize("v", [5000, 49152])
def test_floors_keep_exactly_the_defined_set(v: int) -> None:
    rng = np.random.default_rng(v)
    rows = []
    for y in logits_cases(rng, v).values():
        for k, p, mp in FILTERS:
            rows.append((y, k, p, mp))
    y = np.stack([r[0] for r in rows]).astype(np.float32)
    si = inputs(len(rows), top_k=np.array([r[1] for r in rows]),
                top_p=np.array([r[2] for r in rows]), min_p=np.array([r[3] for r in rows]))
    y_dev, si_dev = jnp.asarray(y), jax.tree.map(jnp.asarray, si)
    tau = np.asarray(jax.jit(floors)(y_dev, si_dev))
    inside = np.asarray(jax.jit(candidates)(y_dev, si_dev).inside)
    slow = 0
    for i, (row, k, p, mp) in enumerate(rows):
        keep, margin = reference_kept(row.astype(np.float32), k, p, mp)
        got = y[i] >= tau[i]
        # float32 sums can only disagree with float64 on tokens within 1e-5 of the boundary
        differs = got != keep
        assert not np.any(differs & (margin > 1e-5)), (i, k, p, mp, np.flatnonzero(differs))
        # inside: the kept set ends before the last candidate (the narrow draw suffices);
        # top-k above the candidates always takes the exact path
        assert inside[i] == (got.sum() < CANDIDATES and not k > CANDIDATES), (i, k, p, mp)
        slow += bool(k > CANDIDATES or (p < 1 and keep.sum() >= CANDIDATES))
    assert slow >= 8  # the exact bisection ran, for top-k and for top-p


def draws(logits: np.ndarray, n: int, **kw: float | int) -> np.ndarray:
    """``n`` tokens from one row of logits: n rows, the same logits, counters 0..n-1."""
    si = inputs(n, counters=np.arange(n), **kw)  # type: ignore[arg-type]
    x = jnp.asarray(np.broadcast_to(logits.astype(np.float32), (n, logits.shape[0])))
    return np.asarray(jax.jit(sample)(x, jax.tree.map(jnp.asarray, si)).tokens)


def chi_square_p(tokens: np.ndarray, probs: np.ndarray) -> float:
    counts = np.bincount(tokens, minlength=probs.shape[0])
    expected = probs * tokens.shape[0]
    assert np.all(counts[expected == 0] == 0)
    nz = expected > 0
    assert nz.sum() > 1  # a one-token set has nothing to test
    return float(stats.chisquare(counts[nz], expected[nz]).pvalue)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max())
    return e / e.sum()


def test_temperature_one_matches_the_softmax() -> None:
    rng = np.random.default_rng(1)
    logits = rng.standard_normal(40) * 1.5
    tokens = draws(logits, 40_000)
    assert chi_square_p(tokens, softmax(logits)) > 1e-4


def test_temperature_scales_the_logits() -> None:
    rng = np.random.default_rng(2)
    logits = rng.standard_normal(30)
    tokens = draws(logits, 30_000, temperature=0.5)
    assert chi_square_p(tokens, softmax(logits / 0.5)) > 1e-4


@pytest.mark.parametrize(("k", "p", "mp"), [(5, 1.0, 0.0), (0, 0.8, 0.0), (0, 1.0, 0.05),
                                              (10, 0.9, 0.05)])
def test_filtered_draws_follow_the_renormalised_set(k: int, p: float, mp: float) -> None:
    rng = np.random.default_rng(3)
    logits = rng.standard_normal(64) * 1.5
    keep, _ = reference_kept(logits.astype(np.float32), k, p, mp)
    probs = np.where(keep, softmax(logits), 0.0)
    tokens = draws(logits, 30_000, top_k=k, top_p=p, min_p=mp)
    assert np.all(keep[tokens])
    assert chi_square_p(tokens, probs / probs.sum()) > 1e-4


def test_wide_nucleus_draws_follow_the_set() -> None:
    """A nucleus wider than the candidates: the bisection sets the floor, the vocabulary-wide
    draw samples it."""
    rng = np.random.default_rng(4)
    logits = rng.standard_normal(400) * 0.5
    keep, _ = reference_kept(logits.astype(np.float32), 0, 0.9, 0.0)
    assert keep.sum() > CANDIDATES
    probs = np.where(keep, softmax(logits), 0.0)
    tokens = draws(logits, 40_000, top_p=0.9)
    assert np.all(keep[tokens])
    assert chi_square_p(tokens, probs / probs.sum()) > 1e-4


def test_consecutive_draws_are_independent() -> None:
    """Pairs of consecutive tokens of one seed over two equally likely tokens: all four pairs
    equally often (a hash that correlated neighbouring counters would skew them)."""
    n = 20_000
    two = np.full(32, -np.inf)
    two[:2] = 0.0
    tokens = draws(two, n).reshape(-1, 2)
    pairs = np.bincount(tokens[:, 0] * 2 + tokens[:, 1], minlength=4)
    assert stats.chisquare(pairs).pvalue > 1e-4


def test_a_row_draws_the_same_tokens_whatever_its_neighbours() -> None:
    rng = np.random.default_rng(5)
    v = 3000
    cases = logits_cases(rng, v)
    mine = cases["peaked"].astype(np.float32)
    for temp, k, p, mp in [(0.8, 0, 1.0, 0.0), (0.8, 0, 0.95, 0.0), (1.0, 50, 1.0, 0.05),
                           (1.3, 0, 0.999, 0.0), (0.7, 700, 1.0, 0.0)]:
        alone = []
        for c in range(12):
            si = inputs(1, temperature=temp, top_k=k, top_p=p, min_p=mp,
                        seeds=np.array([1234]), counters=np.array([c]))
            alone.append(int(jax.jit(sample)(jnp.asarray(mine[None]),
                                             jax.tree.map(jnp.asarray, si)).tokens[0]))
        s = 16
        for c in range(12):
            x = np.stack([list(cases.values())[i % 4] for i in range(s)]).astype(np.float32)
            x[5] = mine
            seeds = rng.integers(0, 2**32, s).astype(np.uint32)
            seeds[5] = 1234
            counters = rng.integers(0, 100, s)
            counters[5] = c
            temps = rng.choice([0.0, 0.7, 1.5], s)
            temps[5] = temp
            ks = rng.choice([0, 5, 500], s)
            ks[5] = k
            ps = rng.choice([1.0, 0.9, 0.999], s)
            ps[5] = p
            mps = rng.choice([0.0, 0.1], s)
            mps[5] = mp
            si = inputs(s, temperature=temps, top_k=ks, top_p=ps, min_p=mps, seeds=seeds,
                        counters=counters)
            got = jax.jit(sample)(jnp.asarray(x), jax.tree.map(jnp.asarray, si)).tokens
            assert int(got[5]) == alone[c], (temp, k, p, mp, c)


def test_gumbel_noise_is_finite_and_within_its_reach() -> None:
    """25M noise values (at 24-bit uniforms, 1 in 2**24 was +inf: a token drawn whatever its
    logit): all finite, and max - min below ``GUMBEL_REACH``, which the narrow draw relies on."""
    keys = _row_keys(jnp.arange(512, dtype=jnp.uint32), jnp.zeros(512, jnp.int32))
    g = jax.jit(_gumbel)(keys, jnp.arange(49152, dtype=jnp.int32))
    lo, hi = float(jnp.min(g)), float(jnp.max(g))
    assert np.isfinite(lo) and np.isfinite(hi), (lo, hi)
    assert hi - lo < GUMBEL_REACH - 0.5, (lo, hi)


def draw_cases(rng: np.random.Generator, v: int) -> dict[str, np.ndarray]:
    """``logits_cases`` and rows for the narrow draw by reach: a few tokens far above the rest
    (an unfiltered row draws among the candidates), a nucleus wider than the candidates whose
    tail is far below (top-p flagged exact, still narrow), and ties among the far ones."""
    cases = logits_cases(rng, v)
    spiky = rng.standard_normal(v)
    spiky[rng.integers(0, v, 20)] += 40.0
    wide_far = rng.standard_normal(v)
    wide_far[rng.choice(v, 300, replace=False)] = 40.0 + rng.standard_normal(300) * 0.1
    tied_far = np.zeros(v)
    tied_far[rng.choice(v, 50, replace=False)] = 30.0
    nan_row = rng.standard_normal(v)
    nan_row[7] = np.nan
    return {**cases, "spiky": spiky, "wide_far": wide_far, "tied_far": tied_far,
            "nan": nan_row}


TOP_KS = {"lax": jax.lax.top_k, **{isa: native.load(isa).top_k for isa in
                                     (native.runnable_isas() if native_available() else [])}}


@pytest.mark.parametrize(("top_k", "v"), [("lax", 3000)] + [(k, 49152) for k in TOP_KS])
def test_draw_gives_sample_tokens(top_k: str, v: int) -> None:
    """The common step's executable draws ``sample``'s tokens for every seed, row and filter:
    greedy and sampled rows, every filter set of ``FILTERS`` (top-k above the candidates, nuclei
    wider than them), ties, -inf and NaN rows; unfiltered rows also against ``sample``'s
    vocabulary-wide draw (no row filtering). Every path of the draw runs."""
    rng = np.random.default_rng(v + 11)
    rows = [(y, k, p, mp) for y in draw_cases(rng, v).values() for k, p, mp in FILTERS]
    s = len(rows)
    x = jnp.asarray(np.stack([r[0] for r in rows]).astype(np.float32))
    fn = jax.jit(lambda x, si: draw(x, si, TOP_KS[top_k]))
    ref = jax.jit(sample)
    narrow_by_reach = per_row = 0
    for c in range(3):
        # greedy rows among sampled ones, as the runner sends them (all-greedy steps run argmax)
        temp = rng.choice([0.0, 0.7, 1.0], s).astype(np.float32)
        temp[0] = 0.7
        si = inputs(s, temperature=temp, top_k=np.array([r[1] for r in rows]),
                    top_p=np.array([r[2] for r in rows]), min_p=np.array([r[3] for r in rows]),
                    seeds=rng.integers(0, 2**32, s), counters=np.full(s, c))
        si = jax.tree.map(jnp.asarray, si)
        np.testing.assert_array_equal(np.asarray(fn(x, si)), np.asarray(ref(x, si).tokens),
                                      err_msg=f"c={c}")
        cand = jax.jit(candidates)(x / jnp.where(si.temperature > 0, si.temperature, 1.0)[:, None],
                                   si)
        narrow_by_reach += int(jnp.sum(cand.narrow & ~cand.inside & (si.temperature > 0)))
        per_row += int(jnp.sum(~cand.narrow & (si.temperature > 0)))
    # unfiltered rows, 32 draws each: against the vocabulary-wide draw (no row filters)
    plain = np.repeat([i for i, r in enumerate(rows) if r[1:] == (0, 1.0, 0.0)], 32)
    si = inputs(len(plain), temperature=0.8, seeds=np.arange(len(plain)) * 7 + 1,
                counters=np.arange(len(plain)))
    assert not si.flags.filter
    xs = x[plain]
    si = jax.tree.map(jnp.asarray, si)
    want = np.asarray(ref(xs, si).tokens)
    np.testing.assert_array_equal(np.asarray(fn(xs, si)), want)
    unfiltered = jax.jit(lambda x, si: draw(x, si, filtered=False))
    np.testing.assert_array_equal(np.asarray(unfiltered(xs, si)), want)
    assert narrow_by_reach > 0 and per_row > 0, (narrow_by_reach, per_row)


def test_argmax_is_jnp_argmax() -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((16, 1000)).astype(np.float32)
    x[3, [10, 500]] = 9.0  # a tie: the first index
    x[4] = -np.inf
    x[5, 999] = np.inf
    np.testing.assert_array_equal(np.asarray(jax.jit(argmax)(x)), np.argmax(x, axis=-1))


@pytest.mark.parametrize("fn", [sample, draw], ids=["sample", "draw"])
def test_compiled_sampler_never_sorts_the_vocabulary(fn: object) -> None:
    """XLA:CPU keeps lax.top_k as its partial TopK only in some graph shapes; a full sort of the
    logits costs ~270 ms at [32, 49152] (about two model steps). The optimized HLO of the
    sampler with every stage on, and of ``draw``, must hold no sort."""
    s, v = 32, 49152
    si = dataclasses.replace(inputs(s, top_k=50, top_p=0.9, min_p=0.05),
                             flags=SamplingFlags(*(np.asarray(True) for _ in range(6))))
    hlo = jax.jit(fn).lower(jax.ShapeDtypeStruct((s, v), jnp.float32), si).compile()
    text = hlo.as_text() or ""
    assert "TopK" in text
    assert " sort(" not in text


# ---- grammar masks --------------------------------------------------------------------------
def pack_mask(allowed: np.ndarray) -> np.ndarray:
    """bool[S, V] -> the i32[S, MASK_WIDTH] bitmask (bit t % 32 of word t // 32), built
    independently of the sampler (numpy's little-endian bit packing)."""
    s, v = allowed.shape
    bits = np.zeros((s, MASK_WIDTH * 32), np.uint8)
    bits[:, :v] = allowed
    return np.packbits(bits.reshape(s, -1, 32), axis=-1, bitorder="little").reshape(
        s, -1).view(np.int32)


def with_mask(si: Sampling, mask: np.ndarray | None) -> Sampling:
    flags = dataclasses.replace(si.flags, mask=np.asarray(mask is not None))
    return dataclasses.replace(si, mask=si.mask if mask is None else mask, flags=flags)


def test_all_ones_mask_is_an_exact_identity() -> None:
    """An unconstrained row's mask is all ones: with the mask stage on or off, every output
    (tokens, logprobs, ranks, top-k) is bit for bit the same, greedy or sampled, filtered."""
    rng = np.random.default_rng(9)
    s, v = 8, 1003  # not a multiple of 32: the last mask word is partial
    x = (rng.standard_normal((s, v)) * 3).astype(np.float32)
    for temp, k, p in [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.8, 40, 0.9)]:
        si = inputs(s, temperature=temp, top_k=k, top_p=p, seeds=np.arange(s) * 31)
        si = dataclasses.replace(si, flags=dataclasses.replace(si.flags,
                                                               logprobs=np.asarray(True)))
        off = jax.device_get(jax.jit(sample)(jnp.asarray(x), with_mask(si, None)))
        on = jax.device_get(jax.jit(sample)(
            jnp.asarray(x), with_mask(si, np.full((s, MASK_WIDTH), -1, np.int32))))
        for a, b in zip(jax.tree_util.tree_leaves(off), jax.tree_util.tree_leaves(on),
                        strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("temp, k, p", [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.9, 20, 0.95)])
def test_masked_rows_draw_only_allowed_tokens_with_masked_logprobs(temp: float, k: int,
                                                                   p: float) -> None:
    """Every drawn token is allowed by its row's mask (the best tokens are forbidden, so an
    unmasked draw would pick them), unmasked rows are untouched, and the logprobs are those of
    the masked distribution (vLLM applies the mask first): log_softmax over the allowed set."""
    rng = np.random.default_rng(int(temp * 10) + k)
    s, v = 6, 1003
    x = (rng.standard_normal((s, v)) * 2).astype(np.float32)
    allowed = np.ones((s, v), bool)
    for r in range(0, s, 2):  # even rows constrained: a random tenth, never their argmax
        allowed[r] = rng.random(v) < 0.1
        allowed[r, np.argmax(x[r])] = False
        x[r, np.argmax(x[r])] += 20.0
    allowed[0, :] = False
    allowed[0, 1002] = True  # a single token, in the partial last word
    si = inputs(s, temperature=temp, top_k=k, top_p=p, seeds=np.arange(s) + 5)
    si = dataclasses.replace(si, flags=dataclasses.replace(si.flags, logprobs=np.asarray(True)))
    unmasked = jax.device_get(jax.jit(sample)(jnp.asarray(x), si))
    first = jax.device_get(jax.jit(sample)(jnp.asarray(x), with_mask(si, pack_mask(allowed))))
    odd = np.arange(1, s, 2)  # all-ones rows: bit for bit what they get without a mask stage
    for a, b in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(unmasked),
                    strict=True):
        np.testing.assert_array_equal(a[odd], b[odd])
    assert not any(allowed[r, unmasked.tokens[r]] for r in range(0, s, 2))
    for _ in range(5):
        si = dataclasses.replace(si, counters=si.counters + 1)
        out = jax.device_get(jax.jit(sample)(jnp.asarray(x), with_mask(si, pack_mask(allowed))))
        assert all(allowed[r, out.tokens[r]] for r in range(s)), out.tokens
    assert out.tokens[0] == 1002
    ref = np.where(allowed, x.astype(np.float64), -np.inf)
    ref = ref - np.log(np.exp(ref - ref.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - ref.max(-1, keepdims=True)
    np.testing.assert_allclose(out.logprob, ref[np.arange(s), out.tokens], atol=1e-4)
    assert out.logprob[0] == 0.0  # the only allowed token has all the mass
    assert np.isneginf(out.top_logprobs[0, 1:]).all()


def test_masked_argmax_is_what_sample_gives_greedy_masked_rows() -> None:
    """The runner's guided-greedy executable: the same token as ``sample`` for greedy rows with a
    mask and nothing else, masked and all-ones rows alike (a single allowed token in the partial
    last word, and ties, included)."""
    rng = np.random.default_rng(3)
    s, v = 8, 1003
    x = np.round(rng.standard_normal((s, v)) * 2, 1).astype(np.float32)  # rounded: ties
    allowed = rng.random((s, v)) < 0.2
    allowed[1] = True
    allowed[0, :] = False
    allowed[0, 1002] = True
    si = with_mask(inputs(s, temperature=0.0), pack_mask(allowed))
    full = jax.device_get(jax.jit(sample)(jnp.asarray(x), si))
    fast = jax.device_get(jax.jit(masked_argmax)(jnp.asarray(x), jnp.asarray(si.mask)))
    np.testing.assert_array_equal(fast, full.tokens)
    np.testing.assert_array_equal(fast, np.argmax(np.where(allowed, x, -np.inf), axis=-1))
