"""The grammar backend (serving/engine/structured_output.py) without a model.

Valid instances are teacher-forced through a matcher (every token must be allowed by the mask,
and the matcher must accept at the end); invalid ones must be refused. Random walks over the
allowed tokens produce outputs that are checked only with independent tools: ``jsonschema``,
``re.fullmatch`` with ASCII classes (llguidance's ``\\d`` is Unicode), set membership and a
``lark`` parser.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

import jsonschema
import lark
import llguidance
import numpy as np
import pytest

from serving.engine.sampling_params import SamplingParams, StructuredSpec
from serving.engine.structured_output import (
    GrammarBackend,
    GrammarError,
    GrammarMatcher,
)
from tests.structured.conftest import LOGITS_WIDTH

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "pet": {"anyOf": [{"type": "null"}, {"type": "object",
                                             "properties": {"kind": {"const": "cat"}},
                                             "required": ["kind"]}]},
    },
    "required": ["name", "age"],
}
PERSONS = [
    {"name": "Ann", "age": 31},
    {"name": "Bo \"B\" Li, é 東京", "age": 0, "tags": ["a", "c"], "pet": None},
    {"name": "", "age": 150, "tags": [], "pet": {"kind": "cat"}},
]
NOT_PERSONS = [
    {"name": "Ann"},                        # age missing
    {"name": "Ann", "age": 151},            # over the maximum
    {"name": "Ann", "age": 3, "tags": ["d"]},
    {"name": 7, "age": 3},
]

ARITH = r"""
start: expr
expr: term (("+" | "-") term)*
term: NUMBER | "(" expr ")"
NUMBER: /[0-9]{1,3}/
"""


def allowed(mask_row: np.ndarray, token: int) -> bool:
    return bool((int(mask_row[token // 32]) >> (token % 32)) & 1)


def allowed_ids(mask_row: np.ndarray, width: int) -> np.ndarray:
    bits = np.unpackbits(mask_row.view(np.uint8), bitorder="little")
    return np.flatnonzero(bits[:width])


def force(backend: GrammarBackend, matcher: GrammarMatcher, ids: list[int]) -> bool:
    """Feed ``ids``; True iff every one was allowed by the mask before it and consumed."""
    buf = backend.allocate_masks(1)
    for tok in ids:
        backend.fill_masks(buf, [matcher])
        if not allowed(buf[0], tok) or not matcher.consume(tok):
            return False
    return True


def accepts(backend: GrammarBackend, tokenizer: Any, spec: StructuredSpec, text: str) -> bool:
    """Teacher-force ``text``; True iff every token is allowed and the grammar then accepts
    and allows EOS."""
    m = backend.new_matcher(backend.compile(spec))
    if not force(backend, m, tokenizer.encode(text, add_special_tokens=False)):
        return False
    buf = backend.allocate_masks(1)
    backend.fill_masks(buf, [m])
    return m.is_accepting() and allowed(buf[0], tokenizer.eos_token_id)


def walk(backend: GrammarBackend, tokenizer: Any, spec: StructuredSpec, seed: int,
         max_steps: int = 200) -> str | None:
    """A random walk over allowed tokens until EOS; the decoded text, or None if it ran out of
    steps. Ends at EOS with probability 1/2 whenever EOS is allowed."""
    rng = random.Random(seed)
    m = backend.new_matcher(backend.compile(spec))
    buf = backend.allocate_masks(1)
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for _ in range(max_steps):
        backend.fill_masks(buf, [m])
        choices = allowed_ids(buf[0], LOGITS_WIDTH)
        assert len(choices) > 0 and not m.is_error(), m.error()
        assert choices.max() < len(tokenizer), "an id past the vocabulary was allowed"
        if eos in choices and (len(choices) == 1 or rng.random() < 0.5):
            assert m.consume(eos) and m.is_stopped()
            return str(tokenizer.decode(ids))
        tok = int(rng.choice([c for c in choices if c != eos]))
        assert m.consume(tok), m.error()
        ids.append(tok)
    return None


@pytest.mark.parametrize("compact", [False, True])
def test_json_schema_valid_instances_are_allowed(backend: GrammarBackend, tokenizer: Any,
                                                 compact: bool) -> None:
    spec = StructuredSpec("json", json.dumps(PERSON), disable_any_whitespace=compact)
    for inst in PERSONS:
        jsonschema.validate(inst, PERSON)
        text = json.dumps(inst, ensure_ascii=False,
                          separators=(",", ":") if compact else None)
        assert accepts(backend, tokenizer, spec, text), text
    pretty = json.dumps(PERSONS[1], ensure_ascii=False, indent=2)
    assert accepts(backend, tokenizer, spec, pretty) is not compact


def test_json_schema_invalid_instances_are_refused(backend: GrammarBackend,
                                                   tokenizer: Any) -> None:
    spec = StructuredSpec("json", json.dumps(PERSON))
    for inst in NOT_PERSONS:
        assert not jsonschema.Draft202012Validator(PERSON).is_valid(inst)
        assert not accepts(backend, tokenizer, spec, json.dumps(inst)), inst
    assert not accepts(backend, tokenizer, spec, '{"name": "Ann", "age": 3')  # unfinished


def test_json_random_walks_validate(backend: GrammarBackend, tokenizer: Any) -> None:
    schema = {"type": "object",
              "properties": {"ok": {"type": "boolean"},
                             "n": {"type": "integer", "minimum": -5, "maximum": 5},
                             "c": {"enum": ["red", "green"]}},
              "required": ["ok", "n", "c"], "additionalProperties": False}
    spec = StructuredSpec("json", json.dumps(schema), disable_any_whitespace=True)
    for seed in range(5):
        text = walk(backend, tokenizer, spec, seed)
        assert text is not None
        jsonschema.validate(json.loads(text), schema)


def test_disable_additional_properties(backend: GrammarBackend, tokenizer: Any) -> None:
    schema = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}})
    extra = '{"a": 1, "b": 2}'
    assert accepts(backend, tokenizer, StructuredSpec("json", schema), extra)
    closed = StructuredSpec("json", schema, disable_additional_properties=True)
    assert not accepts(backend, tokenizer, closed, extra)
    assert accepts(backend, tokenizer, closed, '{"a": 1}')


def test_whitespace_pattern(backend: GrammarBackend, tokenizer: Any) -> None:
    schema = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}},
                         "required": ["a"]})
    spec = StructuredSpec("json", schema, whitespace_pattern=r" ?")
    assert accepts(backend, tokenizer, spec, '{ "a": 1}')
    assert not accepts(backend, tokenizer, spec, '{\n"a": 1}')


def test_json_object(backend: GrammarBackend, tokenizer: Any) -> None:
    spec = StructuredSpec("json_object")
    assert accepts(backend, tokenizer, spec, '{"x": [1, {"y": null}], "z": "w"}')
    assert not accepts(backend, tokenizer, spec, "[1, 2]")


def test_regex(backend: GrammarBackend, tokenizer: Any) -> None:
    pattern = r"[0-9]{3}-[a-z]{2,4}(\.[A-Z])?"
    spec = StructuredSpec("regex", pattern)
    for good in ("123-ab", "000-wxyz.Q"):
        assert re.fullmatch(pattern, good, re.ASCII)
        assert accepts(backend, tokenizer, spec, good), good
    for bad in ("12-ab", "123-a", "123-abcde", "123-ab."):
        assert not re.fullmatch(pattern, bad, re.ASCII)
        assert not accepts(backend, tokenizer, spec, bad), bad
    for seed in range(10):
        text = walk(backend, tokenizer, spec, seed)
        assert text is not None and re.fullmatch(pattern, text, re.ASCII), text


def test_choice(backend: GrammarBackend, tokenizer: Any) -> None:
    options = ("positive", "negative", "neutral \"quoted\"")
    spec = StructuredSpec("choice", options)
    for o in options:
        assert accepts(backend, tokenizer, spec, o)
    assert not accepts(backend, tokenizer, spec, "pos")
    assert not accepts(backend, tokenizer, spec, "positives")
    seen = {walk(backend, tokenizer, spec, seed) for seed in range(12)}
    assert seen <= set(options) and len(seen) > 1


def test_lark_grammar(backend: GrammarBackend, tokenizer: Any) -> None:
    spec = StructuredSpec("grammar", ARITH)
    parser = lark.Lark(ARITH)
    assert accepts(backend, tokenizer, spec, "1+(22-333)")
    assert not accepts(backend, tokenizer, spec, "1+")
    assert not accepts(backend, tokenizer, spec, "(1")
    for seed in range(8):
        text = walk(backend, tokenizer, spec, seed, max_steps=400)
        if text is not None:  # a walk can keep opening parentheses; finished ones must parse
            parser.parse(text)
    finished = [walk(backend, tokenizer, spec, s, max_steps=400) for s in range(8)]
    assert any(t is not None for t in finished)


def test_gbnf_grammar(backend: GrammarBackend, tokenizer: Any) -> None:
    gbnf = 'root ::= answer "." \nanswer ::= "yes" | "no"\n'
    spec = StructuredSpec("grammar", gbnf)
    assert accepts(backend, tokenizer, spec, "yes.")
    assert accepts(backend, tokenizer, spec, "no.")
    assert not accepts(backend, tokenizer, spec, "maybe.")


def test_structural_tag(backend: GrammarBackend, tokenizer: Any) -> None:
    tag = {"type": "structural_tag", "triggers": ["<function="],
           "structures": [{"begin": "<function=get_weather>",
                           "schema": {"type": "object",
                                      "properties": {"city": {"type": "string"}},
                                      "required": ["city"]},
                           "end": "</function>"}]}
    spec = StructuredSpec("structural_tag", json.dumps(tag))
    ok = 'Let me look. <function=get_weather>{"city": "Paris"}</function> Done.'
    assert accepts(backend, tokenizer, spec, ok)
    assert accepts(backend, tokenizer, spec, "No call at all.")
    assert not accepts(backend, tokenizer, spec, "x <function=get_weather>{\"town\": 1}")


@pytest.mark.parametrize("spec", [
    StructuredSpec("regex", "[0-"),
    StructuredSpec("regex", "a{2,1}"),
    StructuredSpec("json", '{"type": "array", "uniqueItems": true}'),
    StructuredSpec("json", '{"type": "object"'),
    StructuredSpec("json", "[1]"),
    StructuredSpec("grammar", "start: undefined_rule"),
    StructuredSpec("grammar", "root ::= \"a"),
    StructuredSpec("structural_tag", '{"structures": [], "triggers": ["<f"]}'),
    StructuredSpec("structural_tag", json.dumps(
        {"triggers": ["<g"], "structures": [{"begin": "<f>", "schema": {}, "end": ""}]})),
])
def test_grammar_errors(backend: GrammarBackend, spec: StructuredSpec) -> None:
    with pytest.raises(GrammarError, match=r"^Grammar error: \S") as first:
        backend.compile(spec)
    with pytest.raises(GrammarError) as again:  # refused from the cache, same message
        backend.compile(spec)
    assert str(again.value) == str(first.value)


def test_mask_width_and_ids_past_the_vocabulary(backend: GrammarBackend,
                                                tokenizer: Any) -> None:
    assert LOGITS_WIDTH % 32 != 0
    assert backend.mask_width == (LOGITS_WIDTH + 31) // 32
    buf = backend.allocate_masks(3)
    assert buf.shape == (3, backend.mask_width) and buf.dtype == np.int32
    m = backend.new_matcher(backend.compile(StructuredSpec("choice", ("yes", "no"))))
    backend.fill_masks(buf, [m, None])
    assert (buf[1] == -1).all() and (buf[2] == -1).all()
    ids = allowed_ids(buf[0], backend.mask_width * 32)
    assert len(ids) > 0 and ids.max() < len(tokenizer)
    assert set(tokenizer.convert_ids_to_tokens(ids.tolist())) >= {"yes", "no"}
    # A stopped grammar allows EOS and nothing else.
    assert force(backend, m, tokenizer.encode("yes", add_special_tokens=False))
    backend.fill_masks(buf, [m])
    assert allowed_ids(buf[0], backend.mask_width * 32).tolist() == [tokenizer.eos_token_id]


def test_every_eos_id_ends_a_complete_grammar(tokenizer: Any) -> None:
    eos = [tokenizer.eos_token_id, 0]
    b = GrammarBackend.from_hf_tokenizer(tokenizer, eos, LOGITS_WIDTH)
    m = b.new_matcher(b.compile(StructuredSpec("regex", "ok")))
    assert force(b, m, tokenizer.encode("ok", add_special_tokens=False))
    buf = b.allocate_masks(1)
    b.fill_masks(buf, [m])
    assert allowed_ids(buf[0], LOGITS_WIDTH).tolist() == sorted(eos)


def test_parallel_fill_equals_serial(backend: GrammarBackend, tokenizer: Any) -> None:
    specs = [StructuredSpec("json", json.dumps(PERSON)), StructuredSpec("regex", "[a-z]+"),
             StructuredSpec("choice", ("alpha", "beta"))]
    prefixes = [('{"name": "A', '{"name": "Ann", "age": 1'), ("ab", "xyz"), ("al", "be")]
    matchers: list[GrammarMatcher | None] = []
    for i in range(12):
        m = backend.new_matcher(backend.compile(specs[i % 3]))
        # Different states of the same grammars: the start, and two prefixes.
        prefix = ("", *prefixes[i % 3])[(i // 3) % 3]
        assert force(backend, m, tokenizer.encode(prefix, add_special_tokens=False))
        matchers.append(None if i == 5 else m)
    par = backend.allocate_masks(16)
    par[12:] = 7  # rows past the matchers stay as they are
    backend.fill_masks(par, matchers)
    assert (par[12:] == 7).all() and (par[5] == -1).all()
    for i, m in enumerate(matchers):
        one = backend.allocate_masks(1)
        backend.fill_masks(one, [m])
        assert (one[0] == par[i]).all(), i


def test_copy_is_independent(backend: GrammarBackend, tokenizer: Any) -> None:
    a = backend.new_matcher(backend.compile(StructuredSpec("choice", ("left", "right"))))
    b = a.copy()
    assert force(backend, a, tokenizer.encode("left", add_special_tokens=False))
    assert force(backend, b, tokenizer.encode("right", add_special_tokens=False))
    assert a.is_stopped() and b.is_stopped()


def test_refused_token_is_an_error_state(backend: GrammarBackend, tokenizer: Any) -> None:
    m = backend.new_matcher(backend.compile(StructuredSpec("regex", "[0-9]+")))
    assert m.error() == ""
    assert not m.consume(tokenizer.encode("x", add_special_tokens=False)[0])
    assert m.is_error() and m.error()
    buf = backend.allocate_masks(1)
    buf[0] = 0
    backend.fill_masks(buf, [m])  # the row must still allow something; the owner ends it
    assert (buf[0] == -1).all()


def test_parser_limits_end_a_matcher_not_the_caller(tokenizer: Any) -> None:
    """A mask that would cost more than the limits allow puts the matcher into its error state
    (its owner ends the request); a grammar over the size limit does not compile."""
    def backend_with(**limits: Any) -> GrammarBackend:
        return GrammarBackend.from_hf_tokenizer(
            tokenizer, [tokenizer.eos_token_id], LOGITS_WIDTH,
            limits=llguidance.LLParserLimits(verbose_errors=False, **limits))

    spec = StructuredSpec("json", json.dumps(PERSON))
    tight = backend_with(step_lexer_fuel=10)
    m = tight.new_matcher(tight.compile(spec))
    buf = tight.allocate_masks(1)
    for tok in tokenizer.encode('{"name": "Ann"', add_special_tokens=False):
        tight.fill_masks(buf, [m])
        if m.is_error():
            break
        m.consume(tok)
    assert m.is_error() and "lexer" in m.error()
    buf[0] = 0
    tight.fill_masks(buf, [m])  # the row still allows something until the request ends
    assert (buf[0] == -1).all()
    small = backend_with(max_grammar_size=10)
    with pytest.raises(GrammarError, match="too big"):
        small.compile(spec)


def test_lru_cache_is_bounded(tokenizer: Any) -> None:
    b = GrammarBackend.from_hf_tokenizer(tokenizer, [tokenizer.eos_token_id], LOGITS_WIDTH,
                                         cache_size=3)
    specs = [StructuredSpec("regex", f"a{{{i}}}") for i in range(1, 6)]
    for s in specs[:3]:
        b.compile(s)
    assert b.cache_size == 3
    b.compile(specs[0])  # a hit: now the most recent
    b.compile(specs[3])  # evicts specs[1], the least recent
    assert b.cache_size == 3
    assert b.is_cached(specs[0]) and b.is_cached(specs[3]) and not b.is_cached(specs[1])
    for s in specs:
        b.compile(s)
    assert b.cache_size == 3
    with pytest.raises(GrammarError):
        b.compile(StructuredSpec("regex", "("))
    assert b.cache_size == 3


def test_spec_is_a_frozen_hashable_value() -> None:
    a = StructuredSpec("choice", ("x", "y"))
    assert a == StructuredSpec("choice", ["x", "y"])  # type: ignore[arg-type]
    assert hash(a) == hash(StructuredSpec("choice", ("x", "y")))
    assert a != StructuredSpec("choice", ("y", "x"))
    with pytest.raises(AttributeError):
        a.kind = "regex"  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"Choice '\[\]' cannot be an empty list"):
        StructuredSpec("choice", ())
    with pytest.raises(ValueError, match="must be a string"):
        StructuredSpec("regex", ("a",))
    with pytest.raises(ValueError, match="structured kind"):
        StructuredSpec("xml", "")  # type: ignore[arg-type]
    params = SamplingParams(max_tokens=8, structured=a)
    assert params.structured is a and SamplingParams().structured is None


@pytest.mark.parametrize("thought", ["<think>\nhmm, left or right?</think>",
                                     "I would say </think>", "no opening at all.</think>\n\n"])
def test_a_gated_matcher_waits_for_the_end_of_the_reasoning(
        backend: GrammarBackend, tokenizer: Any, thought: str) -> None:
    """Gated on "</think>" (vLLM's rule for reasoning models): every token is allowed and
    nothing is consumed until the output holds the marker, however it is tokenized ("</" or
    " </" + "think" + ">", or a token that runs past it); then the grammar applies."""
    m = backend.new_matcher(backend.compile(StructuredSpec("choice", ("left", "right"))),
                            after="</think>")
    buf = backend.allocate_masks(1)
    ids = tokenizer.encode(thought, add_special_tokens=False)
    # The gate opens with the token that completes the marker; the rest of that token and the
    # tokens after it are the grammar's.
    opens = next(k for k in range(len(ids)) if "</think>" in tokenizer.decode(ids[:k + 1]))
    for tok in ids[:opens + 1]:
        assert not m.active and not m.is_stopped() and not m.is_accepting()
        buf[0] = 0
        backend.fill_masks(buf, [m])
        assert (buf[0] == -1).all()  # unconstrained while thinking
        assert m.consume(tok)
    assert m.active
    backend.fill_masks(buf, [m])
    assert not allowed(buf[0], tokenizer.encode("x", add_special_tokens=False)[0])
    assert force(backend, m, tokenizer.encode("right", add_special_tokens=False))
    assert m.is_stopped()


def test_a_gate_is_copied_with_its_state(backend: GrammarBackend, tokenizer: Any) -> None:
    """An ``n > 1`` copy taken mid-marker opens where the original does, independently."""
    m = backend.new_matcher(backend.compile(StructuredSpec("regex", "[0-9]+")), after="</think>")
    ids = tokenizer.encode("ok</think>", add_special_tokens=False)
    for tok in ids[:-1]:
        m.consume(tok)
    c = m.copy()
    assert not m.active and not c.active
    m.consume(ids[-1])
    assert m.active and not c.active
    c.consume(ids[-1])
    assert c.active
    assert force(backend, m, tokenizer.encode("42", add_special_tokens=False))
    assert not c.consume(tokenizer.encode("x", add_special_tokens=False)[0])  # now enforced
