"""Engine invariants on the tiny random model (prime-ish dims, both families)."""

from __future__ import annotations

import random
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.testing import tiny_loaded
from ops import native
from ops.attention import ragged_paged_attention_reference, write_kv
from ops.backend import get_attention_fn
from serving.engine.compilation import CompileCounter
from serving.engine.llm import LLM
from serving.engine.output_processor import OutputProcessor
from serving.engine.sampling_params import SamplingParams
from tests.engine.dense import dense_attention, dense_write
from tests.ops.native_host import native_available
from tests.utils import single_seq_inputs

# f32 everywhere: paged (blocked online softmax) vs dense softmax differ only by rounding.
LOGIT_ATOL = 2e-4


def engine_kwargs(**kw: object) -> dict[str, object]:
    base: dict[str, object] = dict(max_model_len=2048, max_num_seqs=16,
                                   max_num_batched_tokens=128, block_size=16,
                                   compilation_cache=False)
    base.update(kw)
    return base


def ops_pair_kwargs(ops_pair: str) -> dict[str, object]:
    """``tiny_loaded`` attention ops: "canonical", the reference's token-major key pages (the
    loader's default), "cpu-backend", the reference as the engine runs it on CPU
    (``ops.backend``: dimension-major key pages), or "native", the native CPU kernel on that
    layout (``ops.native``; skipped where this host has none)."""
    if ops_pair == "canonical":
        return {}
    if ops_pair == "native" and not native_available():
        pytest.skip("this host cannot build the native CPU kernels")
    attn_fn, write_fn, _ = get_attention_fn("native" if ops_pair == "native" else "reference")
    return {"attn_fn": attn_fn, "write_fn": write_fn}


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(loaded=tiny_loaded(), **engine_kwargs())


@pytest.mark.parametrize("ops_pair", ["canonical", "cpu-backend", "native"])
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_paged_prefill_and_decode_equal_dense_forward(family: str, ops_pair: str) -> None:
    rng = np.random.default_rng(1)
    toks = rng.integers(0, 256, size=45).tolist()
    dense_model = tiny_loaded(family, attn_fn=dense_attention, write_fn=dense_write).model
    paged_model = tiny_loaded(family, **ops_pair_kwargs(ops_pair)).model
    cfg = paged_model.cfg
    h_dense, _ = dense_model([(None, None)] * cfg.num_layers,
                             single_seq_inputs(toks, 0, [1, 2, 3], 16, 4))
    want = np.asarray(dense_model.logits(h_dense))  # [45, V]
    ps, num_pages = 16, 12
    shape = (cfg.num_kv_heads, num_pages, ps, cfg.head_dim)
    kv = [(jnp.full(shape, jnp.nan), jnp.full(shape, jnp.nan)) for _ in range(cfg.num_layers)]
    pages = [7, 2, 10]  # shuffled, NaN everywhere unwritten
    got = []
    h, kv = paged_model(kv, single_seq_inputs(toks[:30], 0, pages, ps, 4))  # prefill 30
    got.append(np.asarray(paged_model.logits(h)))
    for i in range(30, 45):  # decode one at a time
        h, kv = paged_model(kv, single_seq_inputs(toks[i:i + 1], i, pages, ps, 4))
        got.append(np.asarray(paged_model.logits(h)))
    got_all = np.concatenate(got)
    assert np.isfinite(got_all).all()
    np.testing.assert_allclose(got_all, want, atol=LOGIT_ATOL, rtol=0)
    # The ops asked for are what the model used.
    attn, write = paged_model.layers[0].attn.attn_fn, paged_model.layers[0].attn.write_fn
    if ops_pair == "native":
        kernels = native.kernels()
        assert kernels is not None and attn == kernels.ragged_paged_attention
    else:
        assert getattr(attn, "func", attn) is ragged_paged_attention_reference
    assert getattr(write, "func", write) is write_kv


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randrange(3, 90))] for _ in range(n)]


def test_greedy_alone_equals_in_batch_of_16(llm: LLM) -> None:
    ps = prompts(16)
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = llm.generate([ps[0]], greedy, use_tqdm=False)[0].outputs[0].token_ids
    batch = llm.generate(ps, greedy, use_tqdm=False)
    assert batch[0].outputs[0].token_ids == alone
    assert all(len(r.outputs[0].token_ids) == 24 for r in batch)


def test_seeded_sampling_is_batch_invariant(llm: LLM) -> None:
    ps = prompts(12, seed=3)
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=20,
                       ignore_eos=True)
    alone = llm.generate([ps[5]], p, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=0.7, max_tokens=20, ignore_eos=True)
    batch = llm.generate(ps, [others] * 5 + [p] + [others] * 6, use_tqdm=False)
    assert batch[5].outputs[0].token_ids == alone
    again = llm.generate([ps[5]], p, use_tqdm=False)[0].outputs[0].token_ids
    assert again == alone
    different = llm.generate([ps[5]], SamplingParams(
        temperature=1.0, seed=99, max_tokens=20, ignore_eos=True), use_tqdm=False)
    assert different[0].outputs[0].token_ids != alone


def test_plain_sampled_steps_run_draw_and_draw_samples_tokens(llm: LLM) -> None:
    """Steps whose rows are greedy or draw with temperature, top-k, top-p and min-p only run the
    ``draw[S]`` executable (with the native top-k kernel where the backend has it); the same
    requests with logprobs run ``sample[S]`` and draw the same tokens for the same seeds."""
    runner = llm.engine.runner
    calls: dict[str, int] = {"draw": 0, "draw_unfiltered": 0, "sample": 0}
    saved = dict(runner._exe)

    def counted(name: str, exe: Any) -> Any:
        def run(*args: Any) -> Any:
            calls[name] = calls.get(name, 0) + 1
            return exe(*args)
        return run

    def params(logprobs: int | None) -> list[SamplingParams]:
        kinds = [dict(temperature=0.8, top_p=0.95), dict(temperature=0.0),
                 dict(temperature=1.0, top_k=5, min_p=0.05), dict(temperature=0.7)]
        return [SamplingParams(seed=i, max_tokens=12, ignore_eos=True, logprobs=logprobs,
                               **kinds[i % 4]) for i in range(8)]  # type: ignore[arg-type]

    ps = prompts(8, seed=4)
    runner._exe.update({k: counted(k[0], e) for k, e in saved.items()})
    try:
        plain = llm.generate(ps, params(None), use_tqdm=False)
        drawn = calls["draw"] + calls["draw_unfiltered"]
        assert calls["draw"] > 0 and calls["sample"] == 0, calls
        # no row filters: the vocabulary-wide draw
        tempered = llm.generate(ps[:2], SamplingParams(temperature=0.9, seed=3, max_tokens=4),
                                use_tqdm=False)
        assert calls["draw_unfiltered"] > 0 and calls["sample"] == 0, calls
        drawn = calls["draw"] + calls["draw_unfiltered"]
        with_lp = llm.generate(ps, params(0), use_tqdm=False)
        tempered_lp = llm.generate(ps[:2], SamplingParams(temperature=0.9, seed=3, max_tokens=4,
                                                          logprobs=0), use_tqdm=False)
        assert calls["sample"] > 0 and calls["draw"] + calls["draw_unfiltered"] == drawn, calls
    finally:
        runner._exe.update(saved)
    for a, b in zip(plain + tempered, with_lp + tempered_lp, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert runner.num_recompiles == 0
    kernels = native.kernels()
    if kernels is not None:
        s = runner.cfg.max_num_seqs
        assert f"xlaserve_{kernels.isa}_top_k" in runner._exe[("draw", s)].as_text()


def test_chunked_prefill_matches_unchunked() -> None:
    rng = np.random.default_rng(5)
    prompt = rng.integers(0, 256, size=1500).tolist()
    p = SamplingParams(temperature=0.0, max_tokens=8, prompt_logprobs=0, logprobs=0,
                       ignore_eos=True)
    res = {}
    for budget in (64, 1536):
        llm = LLM(loaded=tiny_loaded(), **engine_kwargs(max_num_batched_tokens=budget,
                                                        max_num_seqs=4))
        res[budget] = llm.generate([prompt], p, use_tqdm=False)[0]
        assert llm.engine.runner.num_recompiles == 0
    a, b = res[64], res[1536]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert a.prompt_logprobs is not None and b.prompt_logprobs is not None
    assert a.prompt_logprobs[0] is None
    lp_a = np.array([x.logprob for x in a.prompt_logprobs[1:]])
    lp_b = np.array([x.logprob for x in b.prompt_logprobs[1:]])
    np.testing.assert_allclose(lp_a, lp_b, atol=1e-4)


def test_random_stress_with_aborts_returns_every_page(llm: LLM) -> None:
    """200 random requests (greedy and sampled, n up to 3, logprobs, penalties, stop strings),
    a tenth aborted at random while running: every page comes back, no request is left, and
    JAX compiled nothing (its own compile events, counted over every step)."""
    eng = llm.engine
    rng = random.Random(7)
    free0 = eng.kv.num_free
    recompiles0 = eng.runner.num_recompiles
    processor, outputs = eng.input_processor(), OutputProcessor(eng.tokenizer)
    ids = [f"stress{i}" for i in range(200)]
    for i, rid in enumerate(ids):
        n = rng.choice([1, 1, 1, 2, 3])
        p = SamplingParams(temperature=rng.choice([0.0, 0.8]) if n == 1 else 0.8, n=n, seed=i,
                           max_tokens=rng.randrange(1, 40), ignore_eos=rng.random() < 0.5,
                           logprobs=rng.choice([None, 0, 3]),
                           presence_penalty=rng.choice([0.0, 0.5]),
                           stop=rng.choice([[], ["a"]]))
        spec = processor.sampling_request(
            rid, [rng.randrange(256) for _ in range(rng.randrange(1, 200))], p)
        outputs.add(spec)
        eng.add_request(spec)
    steps = stopped = 0
    while eng.has_work:
        done = outputs.process(eng.step())
        for rid, index in done.stopped:  # stop strings, found off the engine's records
            eng.finish_sequence(rid, index)
            stopped += 1
        steps += 1
        if rng.random() < 0.1:
            victim = rng.choice(ids)
            eng.abort(victim)
            outputs.drop(victim)
        if steps % 25 == 0:
            eng.kv.check()
    eng.kv.check()
    assert stopped > 0  # the stop-string path ran
    assert eng.kv.num_free == free0
    assert not eng.scheduler.requests and not eng.scheduler.seqs
    assert eng.runner.num_recompiles == recompiles0 == 0


def test_compile_counter_sees_real_compiles(llm: LLM) -> None:
    """The counter behind num_recompiles is JAX's own: a jitted call with a new weak type
    retraces and compiles, and so does an executable the runner did not build ahead of time
    (swapped in here on purpose: the old runner's jit-on-first-use dispatch). Then restored."""
    counter = CompileCounter()
    f = jax.jit(lambda x: x * 2)
    f(jnp.float32(1.0))
    with counter.watching():
        f(jnp.float32(2.0))
    assert counter.count == 0
    with counter.watching():
        f(3.0)  # a Python float is weakly typed: a new trace and a new executable
    assert counter.count == 2

    runner = llm.engine.runner
    greedy = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    llm.generate([[1, 2, 3]], greedy, use_tqdm=False)
    assert runner.num_recompiles == 0
    saved = dict(runner._exe)
    try:
        for key in [k for k in runner._exe if k[0] == "argmax"]:
            runner._exe[key] = jax.jit(lambda lg: jnp.argmax(lg, axis=-1).astype(jnp.int32))
        llm.generate([[1, 2, 3]], greedy, use_tqdm=False)
        assert runner.num_recompiles >= 2  # traced and compiled while serving
    finally:
        runner._exe.clear()
        runner._exe.update(saved)
        runner.compiles.events.clear()
    llm.generate([[1, 2, 3]], greedy, use_tqdm=False)
    assert runner.num_recompiles == 0


def test_shapes_outside_the_compiled_set_are_errors(llm: LLM) -> None:
    runner = llm.engine.runner
    buckets = runner.cfg.token_buckets
    with pytest.raises(ValueError, match="exceed max_num_batched_tokens"):
        runner.bucket(buckets[-1] + 1)
    small, big = buckets[0], buckets[1]
    with pytest.raises(TypeError):  # the executable of one bucket refuses another's shapes
        runner._exe[("step", small)](runner.state, runner.kv, runner.empty_inputs(big))
    assert runner.num_recompiles == 0


def test_preemption_under_tiny_pool_completes_identically() -> None:
    ps = prompts(6, seed=11)
    p = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    big = LLM(loaded=tiny_loaded(), **engine_kwargs(max_num_batched_tokens=64, max_num_seqs=8))
    small = LLM(loaded=tiny_loaded(), **engine_kwargs(max_num_batched_tokens=64, max_num_seqs=8,
                                                      num_kv_pages=14, max_model_len=160))
    want = [r.outputs[0].token_ids for r in big.generate(ps, p, use_tqdm=False)]
    got = [r.outputs[0].token_ids for r in small.generate(ps, p, use_tqdm=False)]
    assert small.engine.scheduler.num_preemptions > 0
    assert got == want
    small.engine.kv.check()
    assert small.engine.kv.num_used == 0


ASCII_ONLY = {t: -100.0 for t in range(128, 259)}  # keep the random model's text printable


def test_stop_strings_cut_exactly_and_finish_reasons(llm: LLM) -> None:
    ps = prompts(1, seed=2)[0]

    def run(**kw: object) -> object:
        p = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True,
                           logit_bias=ASCII_ONLY, **kw)  # type: ignore[arg-type]
        return llm.generate([ps], p, use_tqdm=False)[0].outputs[0]

    base = run()
    text = base.text
    assert base.finish_reason == "length" and len(text) == 30
    stop = text[10:13]
    cut = run(stop=[stop])
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == text[:text.index(stop)]
    incl = run(stop=[stop], include_stop_str_in_output=True)
    assert incl.text == text[:text.index(stop) + len(stop)]
    tok = base.token_ids[5]
    st = run(stop_token_ids=[tok])
    assert st.stop_reason == tok and st.token_ids[-1] == tok
    assert st.token_ids == base.token_ids[:base.token_ids.index(tok) + 1]


def test_invalid_utf8_bytes_are_flushed_at_the_end(llm: LLM) -> None:
    ps = prompts(1, seed=2)[0]
    out = llm.generate([ps], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                            logit_bias={208: 100.0}), use_tqdm=False)[0]
    o = out.outputs[0]
    assert o.token_ids == [208] * 12
    assert o.text == llm.tokenizer.decode(o.token_ids)


def test_min_tokens_bans_eos_and_logit_bias_forces_token(llm: LLM) -> None:
    ps = prompts(1, seed=4)[0]
    forced = llm.generate([ps], SamplingParams(temperature=0.0, max_tokens=5,
                                               logit_bias={65: 100.0}), use_tqdm=False)[0]
    assert forced.outputs[0].token_ids == [65] * 5
    eos = 258
    r = llm.generate([ps], SamplingParams(temperature=0.0, max_tokens=6, min_tokens=6,
                                          logit_bias={eos: 100.0}), use_tqdm=False)[0]
    assert len(r.outputs[0].token_ids) == 6 and eos not in r.outputs[0].token_ids[:5]


def test_logprobs_are_consistent(llm: LLM) -> None:
    ps = prompts(1, seed=9)[0]
    r = llm.generate([ps], SamplingParams(temperature=0.0, max_tokens=6, logprobs=5,
                                          ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert r.logprobs is not None and len(r.logprobs) == 6
    for tok, lp in zip(r.token_ids, r.logprobs, strict=True):
        assert lp.token_id == tok and lp.rank == 1  # greedy picks the top token
        assert len(lp.top) == 5 and lp.top[0][0] == tok
        assert abs(lp.top[0][1] - lp.logprob) < 1e-5
        vals = [v for _, v in lp.top]
        assert vals == sorted(vals, reverse=True) and all(v <= 0 for v in vals)


def test_penalties_change_greedy_output(llm: LLM) -> None:
    ps = prompts(1, seed=13)[0]
    plain = llm.generate([ps], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0].token_ids
    rep = llm.generate([ps], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True,
                                            frequency_penalty=2.0), use_tqdm=False)
    toks = rep[0].outputs[0].token_ids
    assert toks != plain
    # A strong frequency penalty spreads the output over more distinct tokens.
    assert len(set(toks)) > len(set(plain))


def _cache_copies(hlo: str, cache_shape: tuple[int, ...]) -> list[str]:
    """Instructions of a compiled step that materialise a whole layer's cache anew: a copy,
    transpose or dtype conversion of it (a 16-bit cache converted whole instead of per block),
    under any shape of the same size (XLA may bitcast the cache first)."""
    size = int(np.prod(cache_shape))
    out = []
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%\S+ = \w+\[([\d,]+)\]\S* (copy|transpose|convert)\(", line)
        if m and int(np.prod([int(d) for d in m.group(1).split(",")])) == size:
            out.append(line.strip()[:160])
    return out


# The f16 cache on the two jnp paths is in the slow suite (CI time); the native kernel's f16
# cache, the path auto takes on CPU, stays in the default run.
@pytest.mark.parametrize(("ops_pair", "kv_cache_dtype"), [
    ("canonical", "auto"), ("cpu-backend", "auto"), ("native", "auto"), ("native", "float16"),
    pytest.param("canonical", "float16", marks=pytest.mark.slow),
    pytest.param("cpu-backend", "float16", marks=pytest.mark.slow)])
def test_no_compiled_step_copies_the_kv_cache(ops_pair: str, kv_cache_dtype: str) -> None:
    """The donated cache is updated in place in every bucket. A full-cache copy per layer per
    step is a silent ~20x slowdown with a big pool: XLA:CPU once made one for T=1 only, when
    the write's scatter became a dynamic-update-slice. With an f16 cache
    (``--kv-cache-dtype float16``) no step converts a whole cache either."""
    llm = LLM(loaded=tiny_loaded(**ops_pair_kwargs(ops_pair)), kv_cache_dtype=kv_cache_dtype,
              **engine_kwargs(num_kv_pages=4096, max_num_batched_tokens=64))
    runner = llm.engine.runner
    shape = runner.kv[0][0].shape
    want = jnp.float16 if kv_cache_dtype == "float16" else jnp.float32
    assert all(c.dtype == want for layer in runner.kv for c in layer)
    for t in runner.cfg.token_buckets:
        assert _cache_copies(runner.step_hlo(t), shape) == [], f"bucket T={t}"
