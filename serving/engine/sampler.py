"""On-device sampling from per-row arrays: its own compiled executable after the model step.

Contract (axis letters: S rows, V vocab, C candidates, E bias entries, X any):
- Rows are independent. A row's randomness is a counter-based hash of ``(seed, counter, token
  id)``, so a request draws the same tokens whatever else shares the batch and whichever S bucket
  runs it, and a token's noise does not depend on where it sits in any intermediate array.
- Order (vLLM v1): the grammar mask (structured outputs), penalties, logit bias and min_tokens
  bans, temperature; then min-p and top-k
  set a floor, and top-p keeps the nucleus of what is above the floor. Every filter keeps a set
  ``{y >= tau}`` for an exact per-row value ``tau`` (ties with ``tau`` are kept, as vLLM's
  value-based masks do), so top-k, top-p and min-p select the same token set as their definition.
- The draw is Gumbel-max over the kept set: ``argmax(y + g(seed, counter, id))``, an exact sample
  of ``softmax(y)`` restricted to the set, up to the 23-bit uniforms behind ``g``: ``g`` lies in
  [-2.81, 16.64], so a token more than 19.45 nats below the best one is never drawn (its
  probability is below 4e-9 of the best one's), and none ``GUMBEL_REACH`` below it can win.
  Ties of ``y + g`` go to the least token id, wherever the draw runs.

Cost at S=32, V=49152 on XLA:CPU is what shaped this: a full sort of the logits costs ~270 ms and
threefry Gumbel noise over the vocabulary ~15-60 ms, against ~150 ms for the whole model step. So:
- Filters are settled from the ``CANDIDATES`` largest values (``lax.top_k``, or a native
  kernel's identical selection) whenever the kept set ends inside them, and those rows draw
  among the candidates only; so does a row whose set goes on past them when the last candidate
  is ``GUMBEL_REACH`` below the best value (no token past it can win). Any other row (top-k above
  ``CANDIDATES``, a nucleus or an unfiltered row over a flat distribution) draws over the
  vocabulary, with noise from a few integer ops and two logs per entry instead of threefry; such
  rows are done one at a time (the floor found exactly by bisection over the float order of the
  row's values), so a step pays only for the rows that need it.
- Greedy rows and the all-greedy executable use "max, then the first index equal to it", which
  returns ``jnp.argmax``'s index at a third of its cost on XLA:CPU.
The grammar mask is applied first, so the logprobs reported are those of the masked distribution
(vLLM applies the bitmask to the logits before its sampler); a row without a grammar has an
all-ones mask, which leaves its logits bit for bit as they are.
Optional stages (mask, penalties, bias, sampling, logprobs) sit behind ``lax.cond`` on
``SamplingFlags`` that the runner sets per step; XLA runs only the branch taken. That chain costs
XLA:CPU several ms at [32, 49152] whichever branches run (``bench/sampler_bench.py --synthetic``
times ``sample`` beside ``draw``), so the common step, rows that are greedy or draw with
temperature, top-k, top-p and min-p only, has its own executable, ``draw``: the same tokens as
``sample`` in one graph without conditional stages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic

import jax
import jax.numpy as jnp
import numpy as np

from models.inputs import A
from serving.engine.sampling_params import MAX_LOGPROBS

# Candidate values per row for the filters and the narrow draw. lax.top_k at [32, 49152] costs
# ~2.3 ms for 64 candidates, ~3.3 for 128 and ~4.9 for 256; SmolLM2 at temperature 0.8 and top-p
# 0.95 has 15% / 7% / 2% of its nuclei wider than that, which take the exact per-row path
# (~0.7 ms a row). 128 gave the lowest sampler time in bench/sampler_bench.py.
CANDIDATES = 128
# Gumbel noise lies in [-2.812, 16.636] (every 23-bit uniform, XLA:CPU's logs): a token more than
# 19.45 below the best value can never win the draw. 20 leaves room for the f32 rounding of
# ``y + g`` while |y| < 2**20 (``Candidates.narrow`` checks it).
GUMBEL_REACH = 20.0

# ``top_k(x f32[S, V], k) -> (values, i32 ids)``: ``lax.top_k``, or a kernel giving the same
# values and ids in the same order (values descending, ties by ascending id).
TopK = Callable[[jax.Array, int], tuple[jax.Array, jax.Array]]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplingFlags(Generic[A]):
    """Which optional stages any row of the step needs (bool[] scalars, traced)."""

    sample: A  # some row draws at temperature > 0
    filter: A  # some drawing row uses top-k, top-p or min-p
    penalties: A  # some row has presence / frequency / repetition penalties
    bias: A  # some row has logit_bias entries or min_tokens bans
    logprobs: A  # some row wants logprobs
    mask: A  # some row is constrained by a grammar (``Sampling.mask`` is not all ones)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Sampling(Generic[A]):
    """Per-row sampling arrays: numpy on the host (``HostSamplingInputs``; large constant
    arrays may already be on device), jax.Array in the compiled sampler (``SamplingInputs``)."""

    temperature: A  # f32[S]; 0: greedy
    top_k: A  # i32[S]; 0: off
    top_p: A  # f32[S]; 1: off
    min_p: A  # f32[S]; 0: off
    presence: A  # f32[S]
    frequency: A  # f32[S]
    repetition: A  # f32[S]; 1: off
    seeds: A  # u32[S]
    counters: A  # i32[S]; output index of the token being sampled
    bias_ids: jax.Array | np.ndarray  # i32[S, E]; -1 padding (logit_bias, min_tokens bans)
    bias_vals: jax.Array | np.ndarray  # f32[S, E]
    history: jax.Array | np.ndarray  # i32[S, C]; prompt then output ids, -1 padding
    prompt_lens: A  # i32[S]; how many leading history entries are prompt tokens
    # i32[S, ceil(V/32)]: bit t % 32 of word t // 32 set when token t is allowed; -1: all allowed
    mask: jax.Array | np.ndarray
    flags: SamplingFlags[A]


SamplingInputs = Sampling[jax.Array]
HostSamplingInputs = Sampling[np.ndarray]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplerOutput:
    tokens: jax.Array  # i32[S]
    logprob: jax.Array  # f32[S]; raw-model logprob of the sampled token (after the mask)
    rank: jax.Array  # i32[S]; 1-based rank of the sampled token
    top_ids: jax.Array  # i32[S, MAX_LOGPROBS]
    top_logprobs: jax.Array  # f32[S, MAX_LOGPROBS]


def argmax(x: jax.Array) -> jax.Array:
    """``jnp.argmax(x, axis=-1)`` (the first maximum) as max, then the least index equal to it:
    XLA:CPU runs argmax's variadic reduce ~3x slower than these two plain reductions."""
    v = x.shape[-1]
    best = jnp.max(x, axis=-1, keepdims=True)
    idx = jnp.min(jnp.where(x == best, jnp.arange(v, dtype=jnp.int32), v), axis=-1)
    return jnp.minimum(idx, v - 1)  # a NaN row matches nothing


def masked_argmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """``argmax`` of ``logits`` [S, V] after the grammar ``mask`` [S, ceil(V/32)] (guided greedy
    decoding): the same tokens as ``sample`` gives greedy rows with nothing else to adjust, at
    argmax's cost. ``sample``'s chain of conditional stages costs XLA:CPU about 7 ms more at
    [32, 49152] whichever branches run, as much as a native-kernel decode step's tenth."""
    return argmax(_masked(logits, mask))


# ---- logit adjustments ----------------------------------------------------------------------
def _masked(logits: jax.Array, mask: jax.Array | np.ndarray) -> jax.Array:
    s, v = logits.shape
    bits = (mask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [S, ceil(V/32), 32]
    allowed = bits.reshape(s, -1)[:, :v] != 0
    return jnp.where(allowed, logits, -jnp.inf)


def _apply_mask(logits: jax.Array, si: SamplingInputs) -> jax.Array:
    """Disallowed tokens to -inf; allowed ones keep their exact value (a ``where``, no
    arithmetic). Runs inside its own ``lax.cond`` branch, so the unpacked mask is never fused
    into the argmax after it (on XLA:CPU that fusion costs 9-16 ms at [32, 49152])."""
    return _masked(logits, si.mask)


def _apply_penalties(logits: jax.Array, si: SamplingInputs) -> jax.Array:
    """vLLM semantics: repetition over prompt+output tokens; then frequency (per occurrence)
    and presence (once) over output tokens.

    Sparse, on the [S, C] history rather than dense [S, V] counts (three times cheaper at
    C=1024): each update is a scatter whose duplicate indices all write the same value (computed
    from a gather before it) or add the same amount, so their order cannot matter."""
    s, v = logits.shape
    hist = si.history
    rows = jnp.arange(s)[:, None]
    valid = hist >= 0
    is_out = valid & (jnp.arange(hist.shape[1])[None, :] >= si.prompt_lens[:, None])
    seen = jnp.where(valid, hist, v)  # v: out of range, dropped
    out = jnp.where(is_out, hist, v)
    rep = si.repetition[:, None]
    old = logits.at[rows, seen].get(mode="fill", fill_value=0.0)
    logits = logits.at[rows, seen].set(jnp.where(old > 0, old / rep, old * rep), mode="drop")
    logits = logits.at[rows, out].add(-jnp.broadcast_to(si.frequency[:, None], out.shape),
                                      mode="drop")
    old = logits.at[rows, out].get(mode="fill", fill_value=0.0)
    return logits.at[rows, out].set(old - si.presence[:, None], mode="drop")


def _apply_bias(logits: jax.Array, si: SamplingInputs) -> jax.Array:
    s, v = logits.shape
    ids = jnp.where(si.bias_ids >= 0, si.bias_ids, v)  # v: out of range, dropped
    return logits.at[jnp.arange(s)[:, None], ids].add(si.bias_vals, mode="drop")


# ---- thresholds -----------------------------------------------------------------------------
def _order_key(x: jax.Array) -> jax.Array:
    """f32 -> u32 with the same order (negative floats reversed), for bisection over values."""
    i = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(i >> 31 == 1, ~i, i | jnp.uint32(0x80000000))


def _from_key(k: jax.Array) -> jax.Array:
    i = jnp.where(k >> 31 == 1, k & jnp.uint32(0x7FFFFFFF), ~k)
    return jax.lax.bitcast_convert_type(i, jnp.float32)


def _least_value_where(pred: Callable[[jax.Array], jax.Array], lo: jax.Array,
                       hi: jax.Array) -> jax.Array:
    """The least float ``t`` in ``[lo, hi]`` (f32[] each) with ``pred(t)``, given ``pred``
    monotone in ``t`` (false below some point, true from it on) and true at ``hi``.

    Bisection over the order keys: exact, at most 32 rounds. Called for one row at a time, so
    each round reads one row (~200 KB at V=49152, cache-resident) and a step pays only for the
    rows that need it. For the predicates used here the answer is always one of the row's values
    (they change only there).
    """
    def halve(c: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        lo_k, hi_k = c
        mid = lo_k + (hi_k - lo_k) // 2
        ok = pred(_from_key(mid))
        return jnp.where(ok, lo_k, mid), jnp.where(ok, mid, hi_k)

    # lo's key minus one stands for "below lo": never evaluated, taken as false.
    _, hi_k = jax.lax.while_loop(lambda c: c[1] - c[0] > 1, halve,
                                 (_order_key(lo) - 1, _order_key(hi)))
    return _from_key(hi_k)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Candidates:
    """What the ``CANDIDATES`` largest values settle for every row at once (f32/i32/bool[S]
    unless noted)."""

    vals: jax.Array  # f32[S, C]; the largest values, descending
    ids: jax.Array  # i32[S, C]; their token ids
    best: jax.Array  # the largest value
    tau: jax.Array  # the floor, where ``exact`` is false; -inf keeps everything
    inside: jax.Array  # the kept set lies inside the candidates (the narrow draw suffices)
    exact: jax.Array  # top-k above C, or a nucleus that may go past C: see ``row_floor``
    floor: jax.Array  # min-p's floor, and top-k's when k <= C
    # the draw among the candidates is exact: the set ends inside them, or every token past
    # them is too far below the best to win (``GUMBEL_REACH``)
    narrow: jax.Array
    draw_tau: jax.Array  # the floor of the narrow draw, over the candidates


def candidates(y: jax.Array, si: SamplingInputs, top_k: TopK = jax.lax.top_k) -> Candidates:
    """min-p, top-k and top-p from the ``CANDIDATES`` largest values of temperature-scaled
    logits ``y`` [S, V]: exact for every row but those flagged ``exact``."""
    s, v = y.shape
    c = min(CANDIDATES, v)
    # XLA:CPU replaces lax.top_k's full sort with its TopK call only while the sort's one user is
    # a slice: slicing ``vals`` again would be merged into it (and cost ~270 ms at [32, 49152]),
    # so it is only read through reductions, comparisons and gathers below.
    vals, ids = top_k(y, c)  # [S, C]
    best = jnp.max(vals, axis=-1)  # the largest of y, without another pass over it
    last = jnp.min(vals, axis=-1)  # the C-th largest value
    neg_inf = jnp.full((s,), -jnp.inf, jnp.float32)
    # min-p: p >= min_p * p_max  <=>  y >= max + log(min_p); no normalisation needed.
    tau_min_p = jnp.where(si.min_p > 0, best + jnp.log(jnp.maximum(si.min_p, 1e-38)), neg_inf)
    # top-k: the k-th largest value, known here when k <= C.
    k = si.top_k
    use_k = (k > 0) & (k < v)
    kth = jnp.take_along_axis(vals, jnp.clip(k - 1, 0, c - 1)[:, None], axis=-1)[:, 0]
    floor = jnp.maximum(tau_min_p, jnp.where(use_k & (k <= c), kth, neg_inf))
    # top-p over the set above the floor, renormalised (vLLM: top-p after top-k and min-p): a
    # token is kept when the mass strictly above its value is below top_p of the set's mass.
    use_p = si.top_p < 1.0
    w = jnp.where(y >= floor[:, None], jnp.exp(y - best[:, None]), 0.0)  # [S, V]
    budget = si.top_p * jnp.sum(w, axis=-1)
    wc = jnp.where(vals >= floor[:, None], jnp.exp(vals - best[:, None]), 0.0)  # [S, C]
    # the candidates' mass strictly above each candidate's value: the mass before it in rank
    # order, taken at the first of its run of equal values (ties share it)
    above = jnp.cumsum(wc, axis=-1) - wc
    rank = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (s, c))
    prev = jnp.take_along_axis(vals, jnp.maximum(rank - 1, 0), axis=-1)
    first = jax.lax.cummax(jnp.where((rank == 0) | (vals != prev), rank, 0), axis=1)
    above = jnp.take_along_axis(above, first, axis=-1)
    kept = (above < budget[:, None]) & (vals >= floor[:, None])
    tau_p = jnp.where(use_p, jnp.min(jnp.where(kept, vals, jnp.inf), axis=-1), neg_inf)
    tau = jnp.maximum(floor, tau_p)
    # every candidate kept: the nucleus may go on past them
    exact = (use_k & (k > c)) | (use_p & jnp.all(kept, axis=-1))
    inside = (last < tau) & ~exact  # the C-th candidate is out, so is everything below it
    # Past the candidates nothing can win the draw when the last one is GUMBEL_REACH below the
    # best: then a row draws among them with its own floor, and so does a nucleus flagged exact
    # that keeps every candidate (then the true floor is at most the last one's value, so over
    # the candidates it keeps those above ``floor``); top-k above C does not know its floor.
    reach = jnp.where(jnp.abs(best) < 2.0 ** 20, best - GUMBEL_REACH, -jnp.inf)
    nucleus_past = exact & ~(use_k & (k > c))
    narrow = jnp.where(exact, nucleus_past & (last < reach), last < jnp.maximum(tau, reach))
    draw_tau = jnp.where(exact, floor, tau)
    return Candidates(vals, ids, best, tau, inside, exact, floor, narrow, draw_tau)


def row_floor(y: jax.Array, si: SamplingInputs, cand: Candidates, r: jax.Array) -> jax.Array:
    """Row ``r``'s exact floor (f32[]): ``cand.tau[r]``, or for a row flagged ``exact`` the
    k-th largest value and the nucleus found by bisection over the whole row."""
    yr = y[r]
    k, top_p, best = si.top_k[r], si.top_p[r], cand.best[r]

    def exact() -> jax.Array:
        neg_inf = jnp.float32(-jnp.inf)
        # count(y > t) < k first holds at the k-th largest value
        kth = jax.lax.cond(
            (k > 0) & (k < yr.shape[0]),
            lambda: _least_value_where(lambda t: jnp.sum(yr > t) < k, neg_inf, best),
            lambda: neg_inf)
        floor = jnp.maximum(cand.floor[r], kth)
        w = jnp.where(yr >= floor, jnp.exp(yr - best), 0.0)
        budget = top_p * jnp.sum(w)
        nucleus = jax.lax.cond(
            top_p < 1.0,
            lambda: _least_value_where(lambda t: jnp.sum(jnp.where(yr > t, w, 0.0)) < budget,
                                       floor, best),
            lambda: neg_inf)
        return jnp.maximum(floor, nucleus)

    return jax.lax.cond(cand.exact[r], exact, lambda: cand.tau[r])


def floors(y: jax.Array, si: SamplingInputs) -> jax.Array:
    """Every row's exact floor (f32[S]): the filters keep ``{y >= floor}``."""
    cand = candidates(y, si)
    todo = jnp.nonzero(cand.exact, size=y.shape[0], fill_value=0)[0]

    def one(i: jax.Array, out: jax.Array) -> jax.Array:
        return out.at[todo[i]].set(row_floor(y, si, cand, todo[i]))

    return jax.lax.fori_loop(0, jnp.sum(cand.exact), one, cand.tau)


# ---- randomness -----------------------------------------------------------------------------
def _mix32(h: jax.Array) -> jax.Array:
    """A bijective 32-bit integer finaliser with low bias (xorshift-multiply, "lowbias32")."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def _row_keys(seeds: jax.Array, counters: jax.Array) -> jax.Array:
    """u32[S]: one key per (seed, output index)."""
    return _mix32(_mix32(seeds.astype(jnp.uint32) ^ jnp.uint32(0x9E3779B9))
                  + counters.astype(jnp.uint32) * jnp.uint32(0x85EBCA6B))


def _gumbel(keys: jax.Array, ids: jax.Array) -> jax.Array:
    """Standard Gumbel noise f32[S, X] for token ``ids`` [S, X] (or [X]) of rows with ``keys``
    [S]: a function of (key, id) only. Two hash rounds, then a 23-bit uniform in (0, 1): every
    ``k + 0.5`` is exact in f32 below 2**23 (at 24 bits the top value rounds up to u = 1, whose
    noise is +inf: a token drawn whatever its logit)."""
    h = _mix32(_mix32(ids.astype(jnp.uint32) + keys[:, None]) ^ (keys[:, None] >> 7))
    u = ((h >> 9).astype(jnp.float32) + 0.5) * jnp.float32(2.0 ** -23)
    return -jnp.log(-jnp.log(u))


def _narrow_draw(cand: Candidates, keys: jax.Array, noisy: jax.Array) -> jax.Array:
    """Gumbel-max among the candidates above ``draw_tau`` (no noise on rows not ``noisy``); ties
    of ``y + g`` go to the least token id, as ``argmax`` over the vocabulary gives them."""
    v_out = jnp.iinfo(jnp.int32).max
    z = cand.vals + jnp.where(noisy[:, None], _gumbel(keys, cand.ids), 0.0)
    z = jnp.where(cand.vals >= cand.draw_tau[:, None], z, -jnp.inf)
    best = jnp.max(z, axis=-1, keepdims=True)
    return jnp.min(jnp.where(z == best, cand.ids, v_out), axis=-1)


def _filtered_draw(y: jax.Array, si: SamplingInputs, keys: jax.Array, top_k: TopK
                   ) -> jax.Array:
    """Every row from its candidates where ``narrow``; the others (noisy ones only: a greedy
    row's best value is always a candidate) one at a time: the exact floor, then noise over the
    vocabulary for that row only. A row's own values decide which draw it takes, so its token
    does not depend on its neighbours."""
    s, v = y.shape
    noisy = si.temperature > 0
    vocab = jnp.arange(v, dtype=jnp.int32)
    cand = candidates(y, si, top_k)
    # a NaN row matches nothing: v - 1, as ``argmax`` gives it
    tokens = jnp.minimum(_narrow_draw(cand, keys, noisy), v - 1)
    wide = noisy & ~cand.narrow
    todo = jnp.nonzero(wide, size=s, fill_value=0)[0]

    def one(i: jax.Array, tokens: jax.Array) -> jax.Array:
        r = todo[i]
        zr = y[r] + _gumbel(keys[r][None], vocab)[0]
        zr = jnp.where(y[r] >= row_floor(y, si, cand, r), zr, -jnp.inf)
        return tokens.at[r].set(argmax(zr[None])[0])

    return jax.lax.fori_loop(0, jnp.sum(wide), one, tokens)


def _draw(y: jax.Array, si: SamplingInputs, keys: jax.Array, filtered: jax.Array
          ) -> jax.Array:
    """Gumbel-max over each row's kept set (greedy rows, temperature 0: no noise, the argmax).
    ``filtered`` (bool[], traced) says whether some row filters; without, every row draws over
    the whole vocabulary at once (the same tokens as ``_filtered_draw`` gives them)."""
    def with_filters(y: jax.Array) -> jax.Array:
        return _filtered_draw(y, si, keys, jax.lax.top_k)

    return jax.lax.cond(filtered, with_filters, lambda y: _vocabulary_draw(y, si, keys), y)


def _vocabulary_draw(y: jax.Array, si: SamplingInputs, keys: jax.Array) -> jax.Array:
    """Every row over the whole vocabulary at once, no filter (greedy rows: the argmax)."""
    noise = _gumbel(keys, jnp.arange(y.shape[1], dtype=jnp.int32))
    return argmax(y + jnp.where((si.temperature > 0)[:, None], noise, 0.0))


def _scaled(logits: jax.Array, si: SamplingInputs) -> jax.Array:
    return logits / jnp.where(si.temperature > 0, si.temperature, 1.0)[:, None]


def draw(logits: jax.Array, si: SamplingInputs, top_k: TopK = jax.lax.top_k,
         filtered: bool = True) -> jax.Array:
    """The common step's sampler, the runner's ``draw[S]`` (``filtered``) and
    ``draw_unfiltered[S]`` executables: ``sample(logits, si).tokens`` (i32[S]) for a step whose
    rows are greedy or draw with temperature, top-k, top-p and min-p only (``si.flags``: no mask,
    penalties, bias or logprobs; those are not read), in one graph without conditional stages.
    ``filtered`` (static) must be ``si.flags.filter``: without filters every row draws over the
    vocabulary at once, since a row whose candidates' tail is not ``GUMBEL_REACH`` down would
    take the one-row-at-a-time path. ``top_k``: ``lax.top_k`` or a kernel with its exact results
    (``ops.native``), so the tokens are the same either way."""
    y, keys = _scaled(logits, si), _row_keys(si.seeds, si.counters)
    return _filtered_draw(y, si, keys, top_k) if filtered else _vocabulary_draw(y, si, keys)


# ---- the sampler ----------------------------------------------------------------------------
def sample(logits: jax.Array, si: SamplingInputs) -> SamplerOutput:
    """logits: f32[S, V] straight from the LM head; rows the step does not sample are ignored.
    Logprobs are those of the grammar-masked logits (before penalties, bias and temperature)."""
    s, _ = logits.shape
    flags = si.flags
    raw = jax.lax.cond(flags.mask, _apply_mask, lambda lg, _: lg, logits, si)
    x = jax.lax.cond(flags.penalties, _apply_penalties, lambda lg, _: lg, raw, si)
    x = jax.lax.cond(flags.bias, _apply_bias, lambda lg, _: lg, x, si)

    def sampled(x: jax.Array) -> jax.Array:
        return _draw(_scaled(x, si), si, _row_keys(si.seeds, si.counters), flags.filter)

    tokens = jax.lax.cond(flags.sample, sampled, argmax, x)

    def logprobs(raw: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        lp = jax.nn.log_softmax(raw, axis=-1)
        chosen = jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]
        rank = (lp > chosen[:, None]).sum(axis=-1).astype(jnp.int32) + 1
        top_lp, top_ids = jax.lax.top_k(lp, MAX_LOGPROBS)
        return chosen, rank, top_ids.astype(jnp.int32), top_lp

    def no_logprobs(raw: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        return (jnp.zeros((s,), jnp.float32), jnp.zeros((s,), jnp.int32),
                jnp.zeros((s, MAX_LOGPROBS), jnp.int32), jnp.zeros((s, MAX_LOGPROBS), jnp.float32))

    chosen, rank, top_ids, top_lp = jax.lax.cond(flags.logprobs, logprobs, no_logprobs, raw)
    return SamplerOutput(tokens, chosen, rank, top_ids, top_lp)


def prompt_logprobs(logits: jax.Array, next_ids: jax.Array) -> tuple[jax.Array, ...]:
    """For prompt positions: logprob/rank of the actual next token and the top-k. [T, V] in."""
    lp = jax.nn.log_softmax(logits, axis=-1)
    safe = jnp.maximum(next_ids, 0)
    chosen = jnp.take_along_axis(lp, safe[:, None], axis=-1)[:, 0]
    rank = (lp > chosen[:, None]).sum(axis=-1).astype(jnp.int32) + 1
    top_lp, top_ids = jax.lax.top_k(lp, MAX_LOGPROBS)
    return chosen, rank, top_ids.astype(jnp.int32), top_lp
