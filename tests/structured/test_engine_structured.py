"""Grammar masks in the engine, on the tiny random model (byte tokenizer, so every ASCII string is
reachable token by token): a random model follows a grammar only if the mask makes it. Outputs
are checked with independent tools (``re.fullmatch`` with ASCII classes, set membership,
``jsonschema``), never with llguidance.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import replace

import jsonschema
import numpy as np
import pytest

from models.testing import tiny_loaded
from serving.engine.llm import LLM
from serving.engine.output_processor import OutputProcessor
from serving.engine.sampling_params import SamplingParams, StructuredSpec
from tests.engine.test_engine_tiny import engine_kwargs, prompts

EOS = 258  # the tiny tokenizer's <|im_end|>
SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
                         "age": {"type": "integer", "minimum": 0, "maximum": 99},
                         "tags": {"type": "array", "items": {"enum": ["x", "y"]},
                                  "maxItems": 3}},
          "required": ["name", "age"], "additionalProperties": False}
JSON = StructuredSpec("json", json.dumps(SCHEMA), disable_any_whitespace=True)
REGEX = StructuredSpec("regex", r"[a-c]{2,5}-[0-9]{1,3}")
CHOICE = StructuredSpec("choice", ("red", "green", "blue"))


def check(spec: StructuredSpec, text: str) -> None:
    if spec.kind == "json":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif spec.kind == "regex":
        assert re.fullmatch(r"[a-c]{2,5}-[0-9]{1,3}", text, re.ASCII), text
    else:
        assert text in spec.spec, text


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(loaded=tiny_loaded(), **engine_kwargs())


def constrained(spec: StructuredSpec, **kw: object) -> SamplingParams:
    base: dict[str, object] = dict(temperature=0.0, max_tokens=120, structured=spec)
    base.update(kw)
    return SamplingParams(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("spec", [JSON, REGEX, CHOICE], ids=["json", "regex", "choice"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_outputs_follow_the_grammar_and_stop(llm: LLM, spec: StructuredSpec,
                                             temperature: float) -> None:
    ps = prompts(8, seed=21)
    res = llm.generate(ps, [constrained(spec, temperature=temperature, seed=i)
                            for i in range(8)], use_tqdm=False)
    for r in res:
        o = r.outputs[0]
        assert o.finish_reason == "stop", (o.text, o.finish_reason)
        check(spec, o.text)
    assert llm.engine.runner.num_recompiles == 0


def test_a_random_model_does_not_follow_the_grammar_unmasked(llm: LLM) -> None:
    """The control for the test above: the same prompts without the mask produce text that no
    grammar here accepts (so the passing outputs are the mask's doing)."""
    res = llm.generate(prompts(8, seed=21), SamplingParams(temperature=0.0, max_tokens=20),
                       use_tqdm=False)
    for r in res:
        assert r.outputs[0].text not in CHOICE.spec
        assert not re.fullmatch(r"[a-c]{2,5}-[0-9]{1,3}", r.outputs[0].text, re.ASCII)


def test_n3_each_choice_has_its_own_matcher(llm: LLM) -> None:
    r = llm.generate([prompts(1, seed=3)[0]], constrained(REGEX, n=3, temperature=1.0, seed=5),
                     use_tqdm=False)[0]
    texts = [o.text for o in r.outputs]
    for t in texts:
        check(REGEX, t)
    assert len(set(texts)) > 1, texts  # independent draws, independent grammar states


def test_unconstrained_rows_are_bitwise_unchanged_by_constrained_neighbours(llm: LLM) -> None:
    """Free requests (greedy and seeded sampling, with logprobs) give bitwise the same tokens
    with grammar-constrained neighbours in their steps as without them, and the same logprobs
    (to float rounding: the two runs use different S buckets, whose executables may reduce in
    another order; within one bucket an all-ones mask row is bitwise neutral, see
    tests/engine/test_sampler.py), and the run compiles nothing (the mask path was built at
    warm-up)."""
    ps = prompts(12, seed=8)
    free = [SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=3),
            SamplingParams(temperature=0.9, top_p=0.9, seed=77, max_tokens=16, ignore_eos=True,
                           logprobs=2),
            SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)]
    alone = llm.generate(ps[:3], free, use_tqdm=False)
    specs = [JSON, REGEX, CHOICE]
    mixed = llm.generate(ps, free + [constrained(specs[i % 3], temperature=0.5 * (i % 2),
                                                 seed=i) for i in range(9)], use_tqdm=False)
    for a, b in zip(alone, mixed[:3], strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        la, lb = a.outputs[0].logprobs, b.outputs[0].logprobs
        assert (la is None) == (lb is None)
        if la is not None and lb is not None:
            assert [(x.token_id, [t for t, _ in x.top]) for x in la] == \
                [(x.token_id, [t for t, _ in x.top]) for x in lb]
            np.testing.assert_allclose([[lp for _, lp in x.top] for x in la],
                                       [[lp for _, lp in x.top] for x in lb], rtol=0, atol=1e-5)
    for i, r in enumerate(mixed[3:]):
        check(specs[i % 3], r.outputs[0].text)
    assert llm.engine.runner.num_recompiles == 0


def test_logprobs_are_those_of_the_masked_distribution(llm: LLM) -> None:
    """vLLM's order: the mask comes first, so the alternatives reported are allowed tokens and
    their probabilities sum to one over the allowed set."""
    r = llm.generate([prompts(1, seed=2)[0]], constrained(CHOICE, logprobs=5), use_tqdm=False)
    o = r[0].outputs[0]
    assert o.text in CHOICE.spec and o.logprobs is not None
    first = o.logprobs[0]
    starts = {ord("r"), ord("g"), ord("b")}
    top = [(t, lp) for t, lp in first.top if lp > -np.inf]
    assert {t for t, _ in top} == starts
    assert sum(np.exp(lp) for _, lp in top) == pytest.approx(1.0, abs=1e-4)


def test_a_complete_grammar_lets_eos_through_below_min_tokens(llm: LLM) -> None:
    r = llm.generate([prompts(1, seed=4)[0]],
                     constrained(StructuredSpec("choice", ("ok",)), min_tokens=10),
                     use_tqdm=False)[0]
    o = r.outputs[0]
    assert o.text == "ok" and o.finish_reason == "stop"
    assert o.token_ids == [ord("o"), ord("k"), EOS]


def test_a_gated_grammar_applies_only_after_its_marker(llm: LLM,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``grammar_after`` (what the HTTP layer sets from ``--reasoning-parser``): the output is
    free, token for token the unconstrained run's, up to and including the marker (here a piece
    of that run's own text, since a random model writes no ``</think>``); after it the grammar
    holds, and the request stops when the grammar is complete. (Each sequence of an n > 1 request
    has its own gate: ``test_a_gate_is_copied_with_its_state``.)"""
    p = prompts(1, seed=12)[0]
    free = llm.generate([p], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].text
    marker = free[6:9]
    end = free.index(marker) + len(marker)  # byte tokenizer: a token per character
    make = llm.processor.sampling_request
    monkeypatch.setattr(llm.processor, "sampling_request",
                        lambda *a, **k: replace(make(*a, **k), grammar_after=marker))
    res = llm.generate([p], constrained(REGEX, max_tokens=60), use_tqdm=False)[0]
    for o in res.outputs:
        assert o.text[:end] == free[:end], (o.text, free)
        check(REGEX, o.text[end:])
        assert o.finish_reason == "stop"
    assert not re.fullmatch(r"[a-c]{2,5}-[0-9]{1,3}", free[end:end + 8], re.ASCII)
    assert llm.engine.runner.num_recompiles == 0


def test_a_refused_token_fails_that_request_only(llm: LLM, monkeypatch: pytest.MonkeyPatch
                                                  ) -> None:
    """If a token the grammar refuses is ever sampled (here: the mask fill is switched off),
    that sequence finishes with "error" and the engine and its other requests go on."""
    eng = llm.engine
    monkeypatch.setattr(eng.scheduler, "fill_masks", lambda sched, out: None)
    ps = prompts(2, seed=6)
    res = llm.generate(ps, [constrained(CHOICE),
                            SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)],
                       use_tqdm=False)
    assert res[0].outputs[0].finish_reason == "error"
    assert res[1].outputs[0].finish_reason == "length"
    assert len(res[1].outputs[0].token_ids) == 8
    assert not eng.scheduler.seqs
    eng.kv.check()


def test_preemption_keeps_the_matcher_and_aborts_leak_nothing() -> None:
    """A tiny KV pool forces preemption by recompute: the constrained outputs equal those of a
    roomy engine (the matcher kept its state through the recompute). Then random aborts of
    constrained requests: every page and every matcher comes back."""
    ps = prompts(6, seed=11)
    specs = [JSON, REGEX, CHOICE] * 2
    params = [constrained(s, ignore_eos=False, max_tokens=60) for s in specs]
    big = LLM(loaded=tiny_loaded(), **engine_kwargs(max_num_batched_tokens=64, max_num_seqs=8))
    small = LLM(loaded=tiny_loaded(), **engine_kwargs(max_num_batched_tokens=64, max_num_seqs=8,
                                                      num_kv_pages=14, max_model_len=160))
    want = [r.outputs[0].token_ids for r in big.generate(ps, params, use_tqdm=False)]
    got = [r.outputs[0] for r in small.generate(ps, params, use_tqdm=False)]
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in got] == want
    for spec, o in zip(specs, got, strict=True):
        check(spec, o.text)
    small.engine.kv.check()
    assert small.engine.kv.num_used == 0

    eng = big.engine
    rng = random.Random(3)
    processor, outputs = eng.input_processor(), OutputProcessor(eng.tokenizer)
    ids = [f"g{i}" for i in range(30)]
    for i, rid in enumerate(ids):
        spec = processor.sampling_request(rid, prompts(1, seed=100 + i)[0],
                                          constrained(specs[i % 3], n=1 + i % 2,
                                                      temperature=0.8, seed=i))
        outputs.add(spec)
        eng.add_request(spec)
    seen = {id(q): q for q in eng.scheduler.seqs.values()}
    assert all(q.matcher is not None for q in seen.values())
    while eng.has_work:
        outputs.process(eng.step())
        if rng.random() < 0.3:
            eng.abort(rng.choice(ids))
    eng.kv.check()
    assert eng.kv.num_used == 0 and not eng.scheduler.seqs and not eng.scheduler.requests
    assert all(q.matcher is None for q in seen.values())  # finish and abort release them
    assert eng.runner.num_recompiles == 0
