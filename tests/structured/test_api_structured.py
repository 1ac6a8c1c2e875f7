"""serving/api/structured.py: every request form into one StructuredSpec, and vLLM's 400s.

Also pins phase 1's promise: the generation routes still refuse every constrained form, so a
constrained request is never accepted and run unconstrained before the engine applies masks.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from serving.api.errors import BadRequest
from serving.api.protocol import ChatCompletionRequest, CompletionRequest
from serving.api.structured import compile_grammar, structured_spec, with_tool_constraint
from serving.engine.sampling_params import StructuredSpec
from serving.engine.structured_output import CompiledGrammar, GrammarBackend

SCHEMA = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
SCHEMA_TEXT = json.dumps(SCHEMA)
TAG = {"type": "structural_tag", "triggers": ["<f="],
       "structures": [{"begin": "<f=x>", "schema": {"type": "object"}, "end": "</f>"}]}


def completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"prompt": "hi", **fields})


def spec_of(**fields: Any) -> StructuredSpec | None:
    return structured_spec(completion(**fields))


def refused(match: str, **fields: Any) -> BadRequest:
    with pytest.raises(BadRequest, match=match) as e:
        spec_of(**fields)
    assert e.value.status == 400
    return e.value


@pytest.mark.parametrize(("fields", "expected"), [
    ({}, None),
    ({"guided_json": SCHEMA}, StructuredSpec("json", SCHEMA_TEXT)),
    ({"guided_json": SCHEMA_TEXT}, StructuredSpec("json", SCHEMA_TEXT)),
    ({"guided_regex": "[0-9]+"}, StructuredSpec("regex", "[0-9]+")),
    ({"guided_choice": ["a", "b"]}, StructuredSpec("choice", ("a", "b"))),
    ({"guided_grammar": "start: \"x\""}, StructuredSpec("grammar", "start: \"x\"")),
    ({"guided_json": SCHEMA, "guided_whitespace_pattern": " *",
      "guided_decoding_backend": "guidance"},
     StructuredSpec("json", SCHEMA_TEXT, whitespace_pattern=" *")),
    ({"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True,
                             "disable_additional_properties": True, "disable_fallback": True}},
     StructuredSpec("json", SCHEMA_TEXT, disable_any_whitespace=True,
                    disable_additional_properties=True)),
    ({"structured_outputs": {"regex": "a|b"}}, StructuredSpec("regex", "a|b")),
    ({"structured_outputs": {"choice": ["x"]}}, StructuredSpec("choice", ("x",))),
    ({"structured_outputs": {"grammar": "root ::= \"a\""}},
     StructuredSpec("grammar", "root ::= \"a\"")),
    ({"structured_outputs": {"json_object": True, "whitespace_pattern": " ?"}},
     StructuredSpec("json_object", whitespace_pattern=" ?")),
    ({"structured_outputs": {"json_object": False}}, None),
    ({"structured_outputs": {"structural_tag": json.dumps(TAG)}},
     StructuredSpec("structural_tag", json.dumps(TAG))),
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, StructuredSpec("json_object")),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "n", "schema": SCHEMA, "strict": True}}},
     StructuredSpec("json", SCHEMA_TEXT)),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "n", "schema": SCHEMA}}},
     StructuredSpec("json", SCHEMA_TEXT)),
    ({"response_format": TAG}, StructuredSpec("structural_tag", json.dumps(TAG))),
    # Options ride along with the kind they apply to, and are dropped for the others.
    ({"guided_regex": "a", "guided_whitespace_pattern": " "}, StructuredSpec("regex", "a")),
])
def test_forms(fields: dict[str, Any], expected: StructuredSpec | None) -> None:
    assert spec_of(**fields) == expected


def test_schema_key_order_is_kept() -> None:
    spec = spec_of(guided_json=SCHEMA)
    assert spec is not None and list(json.loads(str(spec.spec))["properties"]) == ["b", "a"]


def test_chat_request_reads_the_same_fields() -> None:
    req = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "guided_choice": ["yes", "no"]})
    assert structured_spec(req) == StructuredSpec("choice", ("yes", "no"))


@pytest.mark.parametrize(("match", "fields"), [
    ("one kind of structured outputs", {"guided_regex": "a", "guided_json": SCHEMA}),
    ("one kind of structured outputs", {"guided_choice": ["a"], "guided_grammar": "start: \"a\""}),
    ("one kind of structured outputs", {"structured_outputs": {"regex": "a", "json": SCHEMA}}),
    ("one kind of structured outputs",
     {"structured_outputs": {"choice": ["a"], "json_object": True}}),
    ("one kind of structured outputs",
     {"guided_json": SCHEMA, "response_format": {"type": "json_object"}}),
    ("one kind of structured outputs",
     {"structured_outputs": {"regex": "a"}, "guided_regex": "a"}),
    (re.escape("Choice '[]' cannot be an empty list"), {"guided_choice": []}),
    (re.escape("Choice '[]' cannot be an empty list"), {"structured_outputs": {"choice": []}}),
    ("list of strings", {"guided_choice": "a"}),
    ("list of strings", {"guided_choice": ["a", 1]}),
    ("must be a JSON schema object", {"guided_json": 42}),
    ("must be a JSON schema object", {"guided_json": "[1, 2]"}),
    ("must be a JSON schema object", {"guided_json": [SCHEMA]}),
    ("not valid JSON", {"guided_json": "{nope"}),
    ("guided_regex must be a string", {"guided_regex": {"pattern": "a"}}),
    ("structured_outputs.regex must be a string", {"structured_outputs": {"regex": ["a"]}}),
    ("guided_grammar must be a string", {"guided_grammar": 3}),
    ("needs a schema",
     {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
    ("needs a json_schema object", {"response_format": {"type": "json_schema"}}),
    ("must be a JSON schema object",
     {"response_format": {"type": "json_schema", "json_schema": {"schema": 5}}}),
    ("only applies to type 'json_schema'",
     {"response_format": {"type": "text", "json_schema": {"schema": SCHEMA}}}),
    ("type must be one of", {"response_format": {"type": "xml"}}),
    ("Request-level structured output backend selection is not supported",
     {"guided_regex": "a", "guided_decoding_backend": "xgrammar"}),
    ("structured_outputs must be an object", {"structured_outputs": "json"}),
    ("unknown fields: backend", {"structured_outputs": {"regex": "a", "backend": "x"}}),
    ("disable_any_whitespace must be a boolean",
     {"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": "yes"}}),
    ("guided_whitespace_pattern must be a string",
     {"guided_json": SCHEMA, "guided_whitespace_pattern": 1}),
])
def test_400_matrix(match: str, fields: dict[str, Any]) -> None:
    refused(match, **fields)


def test_two_kinds_names_the_second_field() -> None:
    err = refused("multiple", guided_regex="a", guided_json=SCHEMA)
    assert err.param == "guided_regex" and "guided_json" in err.message


def test_tool_constraint_excludes_another_constraint() -> None:
    tool = StructuredSpec("json", SCHEMA_TEXT)
    assert with_tool_constraint(None, tool) is tool
    assert with_tool_constraint(tool, None) is tool
    assert with_tool_constraint(None, None) is None
    with pytest.raises(BadRequest, match="either use constraints for structured outputs or "
                                         "tools, not both"):
        with_tool_constraint(StructuredSpec("regex", "a"), tool)


def test_compile_runs_on_the_pool_and_grammar_errors_are_400(backend: GrammarBackend) -> None:
    threads: list[str] = []

    class Spy(ThreadPoolExecutor):
        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            def run() -> Any:
                threads.append(threading.current_thread().name)
                return fn(*args, **kwargs)
            return super().submit(run)

    async def go() -> None:
        with Spy(max_workers=1, thread_name_prefix="cpu") as pool:
            ok = await compile_grammar(backend, StructuredSpec("regex", "[a-z]+"), pool)
            assert isinstance(ok, CompiledGrammar)
            with pytest.raises(BadRequest, match=r"^Grammar error: ") as bad:
                await compile_grammar(backend, StructuredSpec("regex", "[a-"), pool)
            assert bad.value.status == 400
            # The invalid one does not hurt the next.
            again = await compile_grammar(backend, StructuredSpec("choice", ("a", "b")), pool)
            assert backend.new_matcher(again).is_error() is False

    asyncio.run(go())
    assert threads and all(t.startswith("cpu") for t in threads)
