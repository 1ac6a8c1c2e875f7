"""On-device sampling from per-row arrays, called inside the compiled step.

Every row is processed independently of the others, and its randomness comes only from its own
``(seed, counter)`` key, so a request samples the same tokens whatever else shares the batch.
Optional work (penalties, logit bias, top-k/top-p/min-p filtering, logprobs) sits behind
``lax.cond`` on ``SamplingFlags`` the runner computes per step: XLA runs only the branch taken.
A step whose rows are all greedy with nothing to adjust skips the sampler for a plain argmax.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic

import jax
import jax.numpy as jnp
import numpy as np

from models.inputs import A
from serving.engine.sampling_params import MAX_LOGPROBS


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplingFlags(Generic[A]):
    """Which optional stages any row of the step needs (bool[] scalars, traced)."""

    sample: A  # some row draws at temperature > 0
    filter: A  # some drawing row uses top-k, top-p or min-p
    penalties: A  # some row has presence / frequency / repetition penalties
    bias: A  # some row has logit_bias entries or min_tokens bans
    logprobs: A  # some row wants logprobs


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
    flags: SamplingFlags[A]


SamplingInputs = Sampling[jax.Array]
HostSamplingInputs = Sampling[np.ndarray]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplerOutput:
    tokens: jax.Array  # i32[S]
    logprob: jax.Array  # f32[S]; raw-model logprob of the sampled token
    rank: jax.Array  # i32[S]; 1-based rank of the sampled token
    top_ids: jax.Array  # i32[S, MAX_LOGPROBS]
    top_logprobs: jax.Array  # f32[S, MAX_LOGPROBS]


def _apply_penalties(logits: jax.Array, si: SamplingInputs) -> jax.Array:
    """vLLM semantics: repetition over prompt+output tokens; presence/frequency over output."""
    s, v = logits.shape
    hist = si.history
    idx = jnp.arange(hist.shape[1])[None, :]
    valid = hist >= 0
    is_out = valid & (idx >= si.prompt_lens[:, None])
    ids = jnp.where(valid, hist, v)  # v: a dump column dropped below
    rows = jnp.arange(s)[:, None]
    out_counts = jnp.zeros((s, v + 1), jnp.int32).at[rows, ids].add(is_out.astype(jnp.int32))
    seen = jnp.zeros((s, v + 1), jnp.bool_).at[rows, ids].max(valid)
    out_counts, seen = out_counts[:, :v], seen[:, :v]
    rep = si.repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - si.frequency[:, None] * out_counts
    return logits - si.presence[:, None] * (out_counts > 0)


def _apply_bias(logits: jax.Array, si: SamplingInputs) -> jax.Array:
    s, v = logits.shape
    ids = jnp.where(si.bias_ids >= 0, si.bias_ids, v)
    rows = jnp.arange(s)[:, None]
    bias = jnp.zeros((s, v + 1), jnp.float32).at[rows, ids].add(si.bias_vals)
    return logits + bias[:, :v]


def _filter(logits: jax.Array, si: SamplingInputs) -> jax.Array:
    """top-k, then top-p over what is left, then min-p; masked entries become -inf."""
    v = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)  # [S, V]
    k = jnp.where(si.top_k > 0, jnp.minimum(si.top_k, v), v)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)  # [S, 1]
    ranks = jnp.arange(v)[None, :]
    sorted_k = jnp.where(ranks < k[:, None], sorted_desc, -jnp.inf)
    probs = jax.nn.softmax(sorted_k, axis=-1)
    cum_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (cum_before < si.top_p[:, None]) & (ranks < k[:, None])
    keep = keep.at[:, 0].set(True)
    n_keep = keep.sum(axis=-1)
    thresh = jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], axis=-1)
    thresh = jnp.maximum(thresh, kth)
    logits = jnp.where(logits < thresh, -jnp.inf, logits)
    # p >= min_p * p_max  <=>  logit >= max_logit + log(min_p): no normalisation needed.
    min_keep = sorted_desc[:, :1] + jnp.log(jnp.maximum(si.min_p[:, None], 1e-38))
    return jnp.where((si.min_p[:, None] > 0) & (logits < min_keep), -jnp.inf, logits)


def _gumbel(seeds: jax.Array, counters: jax.Array, v: int) -> jax.Array:
    def one(seed: jax.Array, counter: jax.Array) -> jax.Array:
        key = jax.random.fold_in(jax.random.key(seed), counter)
        return jax.random.gumbel(key, (v,), jnp.float32)
    return jax.vmap(one)(seeds, counters)


def sample(logits: jax.Array, si: SamplingInputs) -> SamplerOutput:
    """logits: f32[S, V] straight from the LM head; rows the step does not sample are ignored."""
    s, v = logits.shape
    flags = si.flags
    raw = logits
    x = jax.lax.cond(flags.penalties, _apply_penalties, lambda lg, _: lg, logits, si)
    x = jax.lax.cond(flags.bias, _apply_bias, lambda lg, _: lg, x, si)
    greedy_tok = jnp.argmax(x, axis=-1).astype(jnp.int32)

    def sampled(x: jax.Array) -> jax.Array:
        t = jnp.where(si.temperature > 0, si.temperature, 1.0)[:, None]
        y = x / t
        y = jax.lax.cond(flags.filter, _filter, lambda lg, _: lg, y, si)
        tok = jnp.argmax(y + _gumbel(si.seeds, si.counters, v), axis=-1).astype(jnp.int32)
        return jnp.where(si.temperature > 0, tok, greedy_tok)

    tokens = jax.lax.cond(flags.sample, sampled, lambda _: greedy_tok, x)

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
