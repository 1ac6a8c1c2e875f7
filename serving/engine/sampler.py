"""On-device sampling from per-row arrays, called inside the compiled step.

Every row is processed independently of the others, and its randomness comes only from its own
``(seed, counter)`` key, so a request samples the same tokens whatever else shares the batch.
Optional work (penalties, logit bias, top-k/top-p/min-p filtering, logprobs) sits behind
``lax.cond`` on flags the host computes per step: XLA runs only the branch taken, so a greedy batch
pays for an argmax and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from models.inputs import HostOrDevice
from serving.engine.sampling_params import MAX_LOGPROBS


@jax.tree_util.register_dataclass
@dataclass
class SamplingInputs:
    temperature: HostOrDevice  # f32[S]; 0: greedy
    top_k: HostOrDevice  # i32[S]; 0: off
    top_p: HostOrDevice  # f32[S]; 1: off
    min_p: HostOrDevice  # f32[S]; 0: off
    presence: HostOrDevice  # f32[S]
    frequency: HostOrDevice  # f32[S]
    repetition: HostOrDevice  # f32[S]; 1: off
    seeds: HostOrDevice  # u32[S]
    counters: HostOrDevice  # i32[S]; output index of the token being sampled
    bias_ids: HostOrDevice  # i32[S, L]; -1 padding (logit_bias, and -inf bans for min_tokens)
    bias_vals: HostOrDevice  # f32[S, L]
    history: HostOrDevice  # i32[S, Hh]; prompt then output token ids, -1 padding (penalties only)
    prompt_lens: HostOrDevice  # i32[S]; how many leading history entries are prompt tokens
    flags: HostOrDevice  # bool[5]: any_sample, any_filter, any_penalty, any_bias, any_logprobs


@jax.tree_util.register_dataclass
@dataclass
class SamplerOutput:
    tokens: HostOrDevice  # i32[S]
    logprob: HostOrDevice  # f32[S]; raw-model logprob of the sampled token
    rank: HostOrDevice  # i32[S]; 1-based rank of the sampled token
    top_ids: HostOrDevice  # i32[S, MAX_LOGPROBS]
    top_logprobs: HostOrDevice  # f32[S, MAX_LOGPROBS]


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
    """logits: f32[S, V] straight from the LM head."""
    s, v = logits.shape
    any_sample, any_filter, any_penalty, any_bias, any_logprobs = (si.flags[i] for i in range(5))
    raw = logits
    x = jax.lax.cond(any_penalty, _apply_penalties, lambda lg, _: lg, logits, si)
    x = jax.lax.cond(any_bias, _apply_bias, lambda lg, _: lg, x, si)
    greedy_tok = jnp.argmax(x, axis=-1).astype(jnp.int32)

    def sampled(x: jax.Array) -> jax.Array:
        t = jnp.where(si.temperature > 0, si.temperature, 1.0)[:, None]
        y = x / t
        y = jax.lax.cond(any_filter, _filter, lambda lg, _: lg, y, si)
        tok = jnp.argmax(y + _gumbel(si.seeds, si.counters, v), axis=-1).astype(jnp.int32)
        return jnp.where(si.temperature > 0, tok, greedy_tok)

    tokens = jax.lax.cond(any_sample, sampled, lambda _: greedy_tok, x)

    def logprobs(raw: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        lp = jax.nn.log_softmax(raw, axis=-1)
        chosen = jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]
        rank = (lp > chosen[:, None]).sum(axis=-1).astype(jnp.int32) + 1
        top_lp, top_ids = jax.lax.top_k(lp, MAX_LOGPROBS)
        return chosen, rank, top_ids.astype(jnp.int32), top_lp

    def no_logprobs(raw: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        return (jnp.zeros((s,), jnp.float32), jnp.zeros((s,), jnp.int32),
                jnp.zeros((s, MAX_LOGPROBS), jnp.int32), jnp.zeros((s, MAX_LOGPROBS), jnp.float32))

    chosen, rank, top_ids, top_lp = jax.lax.cond(any_logprobs, logprobs, no_logprobs, raw)
    return SamplerOutput(tokens, chosen, rank, top_ids, top_lp)


def prompt_logprobs(logits: jax.Array, next_ids: jax.Array) -> tuple[jax.Array, ...]:
    """For prompt positions: logprob/rank of the actual next token and the top-k. [T, V] in."""
    lp = jax.nn.log_softmax(logits, axis=-1)
    safe = jnp.maximum(next_ids, 0)
    chosen = jnp.take_along_axis(lp, safe[:, None], axis=-1)[:, 0]
    rank = (lp > chosen[:, None]).sum(axis=-1).astype(jnp.int32) + 1
    top_lp, top_ids = jax.lax.top_k(lp, MAX_LOGPROBS)
    return chosen, rank, top_ids.astype(jnp.int32), top_lp
