"""Tool-call parsers (serving/api/tool_parsers/): golden strings per parser, non-streaming and
fed token by token with the SmolLM2 tokenizer; the streamed content and argument fragments
concatenate to exactly the non-streamed result. Plus tool_choice's defaults, 400s and schemas.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from serving.api.errors import BadRequest
from serving.api.tool_parsers import (
    DeltaMessage,
    ExtractedToolCalls,
    ToolParser,
    get_tool_parser,
    load_tool_parser_plugin,
    tool_parser_names,
)
from serving.api.tool_parsers.tool_choice import (
    ToolChoice,
    named_tool_call,
    required_tool_calls,
    resolve_tool_choice,
    tool_choice_schema,
    tool_choice_spec,
    validate_tools,
)
from serving.engine.structured_output import GrammarBackend

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                  "detail": {"type": "boolean"}, "scale": {"type": "number"},
                                  "opts": {"type": "object"}, "tags": {"type": "array"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"$ref": "#/$defs/tz"}},
    "$defs": {"tz": {"type": "string", "enum": ["UTC", "CET"]}}}}}
TOOLS = [WEATHER, TIME]

Call = tuple[str, dict[str, Any]]
# (parser, model output, expected content, expected calls (name, arguments as a dict))
GOLDEN: list[tuple[str, str, str | None, list[Call]]] = [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
               '{"city": "Paris", "days": 3}}\n</tool_call>',
     "Let me check.\n", [("get_weather", {"city": "Paris", "days": 3})]),
    ("hermes", '<tool_call>{"name":"a","arguments":{"x":1.50,"y":[true,null],"z":-0}}'
               '</tool_call>\n<tool_call>{"arguments": {"q": "é \\"hi\\" \\u00e9\\ud83d\\ude00 '
               '東京"}, "name": "b"}</tool_call>',
     None, [("a", {"x": 1.5, "y": [True, None], "z": 0}), ("b", {"q": 'é "hi" é😀 東京'})]),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"n": 10}}', None, [("f", {"n": 10})]),
    ("hermes", '<tool_call>{"name": "f"}</tool_call>', None, [("f", {})]),
    ("hermes", "Just text with a <tool but no call.", "Just text with a <tool but no call.",
     []),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Tokyo"}}', None,
     [("get_weather", {"city": "Tokyo"})]),
    ("llama3_json", '<|python_tag|>{"name": "a", "parameters": {"k": 1}}; '
                    '{"name": "b", "arguments": {}}', None, [("a", {"k": 1}), ("b", {})]),
    ("llama3_json", "Hello there, {not a call}", "Hello there, {not a call}", []),
    ("mistral", 'Sure. [TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}, '
                '{"name": "neg", "arguments": {"x": -3e2}}]',
     "Sure. ", [("add", {"a": 1, "b": 2}), ("neg", {"x": -300.0})]),
    ("mistral", '[TOOL_CALLS]get_weather{"city": "Rome"}[TOOL_CALLS]get_time{"tz": "CET"}',
     None, [("get_weather", {"city": "Rome"}), ("get_time", {"tz": "CET"})]),
    ("mistral", "No [TOOL_ calls here", "No [TOOL_ calls here", []),
    ("pythonic", '[get_weather(city="San Francisco", detail=True), get_time()]', None,
     [("get_weather", {"city": "San Francisco", "detail": True}), ("get_time", {})]),
    ("pythonic", "[f(a=[1, (2, 3)], b={'k': 'v, w)'}, c=None, d=-1.5, e='é')]", None,
     [("f", {"a": [1, [2, 3]], "b": {"k": "v, w)"}, "c": None, "d": -1.5, "e": "é"})]),
    ("pythonic", "No calls here.", "No calls here.", []),
    ("qwen3_xml", "Checking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
                  "</parameter>\n<parameter=days>\n3\n</parameter>\n<parameter=detail>\nTrue\n"
                  "</parameter>\n<parameter=opts>\n{\"a\": [1, 2]}\n</parameter>\n"
                  "<parameter=scale>\n2.5\n</parameter>\n</function>\n</tool_call>",
     "Checking.\n", [("get_weather", {"city": "Paris", "days": 3, "detail": True,
                                     "opts": {"a": [1, 2]}, "scale": 2.5})]),
    ("qwen3_xml", "<tool_call>\n<function=get_weather>\n<parameter=city>\n007\n</parameter>\n"
                  "<parameter=days>\nnull\n</parameter>\n<parameter=tags>\n['x', 'y']\n"
                  "</parameter>\n<parameter=extra>\n5\n</parameter>\n</function>\n</tool_call>"
                  "\n<tool_call>\n<function=get_time>\n</function>\n</tool_call>",
     None, [("get_weather", {"city": "007", "days": None, "tags": ["x", "y"], "extra": "5"}),
            ("get_time", {})]),
    ("qwen3_xml", "Plain answer.", "Plain answer.", []),
]


def parser(name: str, tokenizer: Any) -> ToolParser:
    return get_tool_parser(name)(tokenizer, TOOLS)


def stream(p: ToolParser, tokenizer: Any, text: str) -> list[DeltaMessage]:
    """Feed ``text`` token by token, as the server's detokenizer would: a step whose text ends
    inside a multi-byte character is held back until the character is whole."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas, previous = [], ""
    for k in range(1, len(ids) + 1):
        current = tokenizer.decode(ids[:k])
        if current.endswith("\ufffd"):
            continue
        d = p.extract_tool_calls_streaming(previous, current, current[len(previous):],
                                           ids[:k - 1], ids[:k], ids[k - 1:k])
        previous = current
        if d is not None:
            deltas.append(d)
    assert previous == text
    final = p.finish_streaming(text)
    return [*deltas, final] if final is not None else deltas


def assemble(deltas: list[DeltaMessage]) -> tuple[str, list[tuple[str, str, str]]]:
    """Content and (id, name, arguments) per call index from a stream of deltas."""
    content = "".join(d.content or "" for d in deltas)
    calls: dict[int, list[str]] = {}
    for d in deltas:
        for tc in d.tool_calls:
            if tc.index not in calls:
                assert tc.id and tc.type == "function" and tc.function.name, tc
                assert tc.index == len(calls)  # calls are announced in order
                calls[tc.index] = [tc.id, tc.function.name, ""]
            else:
                assert tc.id is None and tc.function.name is None
            calls[tc.index][2] += tc.function.arguments or ""
    return content, [(i, n, a) for i, n, a in (calls[k] for k in sorted(calls))]


def test_registry() -> None:
    assert {"hermes", "llama3_json", "mistral", "pythonic", "qwen3_xml"} <= set(
        tool_parser_names())
    with pytest.raises(KeyError, match=r"valid names: .*hermes"):
        get_tool_parser("nope")


def test_plugin_registers_a_parser(tmp_path: Path) -> None:
    plugin = tmp_path / "my_parser.py"
    plugin.write_text(
        "from serving.api.tool_parsers import register_tool_parser\n"
        "from serving.api.tool_parsers.hermes import HermesToolParser\n"
        "@register_tool_parser('test_plugin_hermes')\n"
        "class P(HermesToolParser):\n"
        "    pass\n")
    load_tool_parser_plugin(str(plugin))
    load_tool_parser_plugin(str(plugin))  # loaded once: no second registration
    assert "test_plugin_hermes" in tool_parser_names()
    out = get_tool_parser("test_plugin_hermes")().extract_tool_calls(
        '<tool_call>{"name": "f", "arguments": {}}</tool_call>')
    assert out.tools_called
    with pytest.raises(ValueError, match="not found"):
        load_tool_parser_plugin(str(tmp_path / "missing.py"))
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ValueError, match="failed to load: RuntimeError: boom"):
        load_tool_parser_plugin(str(broken))


@pytest.mark.parametrize(("name", "text", "content", "calls"), GOLDEN)
def test_golden_non_streaming(name: str, text: str, content: str | None, calls: list[Call],
                              tokenizer: Any) -> None:
    out: ExtractedToolCalls = parser(name, tokenizer).extract_tool_calls(text)
    assert out.tools_called == bool(calls)
    assert out.content == content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in out.tool_calls] == calls
    for c in out.tool_calls:
        # Arguments are exactly what json.dumps writes for them.
        assert c.function.arguments == json.dumps(json.loads(c.function.arguments),
                                                  ensure_ascii=False)
        pattern = r"[A-Za-z0-9]{9}" if name == "mistral" else r"chatcmpl-tool-[0-9a-f]{32}"
        assert re.fullmatch(pattern, c.id) and c.type == "function"


@pytest.mark.parametrize(("name", "text", "content", "calls"), GOLDEN)
def test_golden_streaming_equals_non_streaming(name: str, text: str, content: str | None,
                                               calls: list[Call], tokenizer: Any) -> None:
    whole = parser(name, tokenizer).extract_tool_calls(text)
    p = parser(name, tokenizer)
    streamed_content, streamed_calls = assemble(stream(p, tokenizer, text))
    assert streamed_content == (whole.content or "")
    assert [(n, a) for _, n, a in streamed_calls] == [
        (c.function.name, c.function.arguments) for c in whole.tool_calls]
    assert p.streamed_tool_calls == len(calls)


def test_arguments_stream_in_fragments(tokenizer: Any) -> None:
    text = ('<tool_call>{"name": "get_weather", "arguments": {"city": "Saint-Rémy-de-Provence",'
            ' "days": 14, "detail": false}}</tool_call>')
    deltas = stream(parser("hermes", tokenizer), tokenizer, text)
    fragments = [tc.function.arguments for d in deltas for tc in d.tool_calls
                 if tc.function.arguments]
    assert len(fragments) > 5  # streamed as it was generated, not in one piece at the end
    assert deltas[-1].tool_calls and deltas[-1].tool_calls[0].function.arguments == "}"


@pytest.mark.parametrize(("name", "text", "announced"), [
    ("hermes", '<tool_call>{"name": "f", "arguments": {"n": }}</tool_call>', True),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"n": 1}} trailing', True),
    ("llama3_json", '{"name": "f", "parameters": {"a": 1}} and text', True),
    ("llama3_json", "{not a call}", False),
    ("mistral", "[TOOL_CALLS]", False),
    ("pythonic", "[f(1, 2)]", True),  # announced at "f("
    ("pythonic", "[f(a=open('x'))]", True),
    ("qwen3_xml", "<tool_call>\n<function=f>\n<parameter=a>\n1", True),
])
def test_malformed_output_is_content(name: str, text: str, announced: bool,
                                     tokenizer: Any) -> None:
    out = parser(name, tokenizer).extract_tool_calls(text)
    assert out == ExtractedToolCalls(False, (), text)
    # Streamed, it ends as the same content, unless a call had already been announced (a
    # stream cannot take it back; it stops there).
    content, calls = assemble(stream(parser(name, tokenizer), tokenizer, text))
    if announced:
        assert calls and calls[0][1] == "f"
    else:
        assert (content, calls) == (text, [])


def test_validate_tools() -> None:
    assert validate_tools(None) == [] and validate_tools(TOOLS) == TOOLS
    for bad in ({"type": "function"}, [{"type": "function", "function": {"name": ""}}],
                [{"type": "code"}], [{"function": {"name": "f", "parameters": []}}]):
        with pytest.raises(BadRequest):
            validate_tools(bad)


@pytest.mark.parametrize(("tools", "choice", "auto", "expected"), [
    (None, None, False, ToolChoice("none")),
    (TOOLS, None, True, ToolChoice("auto")),
    (TOOLS, "none", False, ToolChoice("none")),
    (None, "none", False, ToolChoice("none")),
    (TOOLS, "required", False, ToolChoice("required")),
    ([], "required", False, ToolChoice("none")),
    (TOOLS, {"type": "function", "function": {"name": "get_time"}}, False,
     ToolChoice("named", "get_time")),
])
def test_tool_choice_defaults(tools: Any, choice: Any, auto: bool, expected: ToolChoice) -> None:
    assert resolve_tool_choice(tools, choice, auto_enabled=auto) == expected


@pytest.mark.parametrize(("tools", "choice", "match"), [
    (None, {"type": "function", "function": {"name": "f"}}, "`tools` must be set"),
    (None, "required", "`tools` must be set"),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "does not match any"),
    (TOOLS, {}, "Invalid value for `function`.*Correct usage"),
    (TOOLS, {"type": "function", "function": {}}, "Expected field `name`.*Correct usage"),
    (TOOLS, {"type": "function", "function": {"name": ""}}, "Invalid `name`"),
    (TOOLS, "sometimes", "Invalid value for `tool_choice`"),
    (TOOLS, None, "requires --enable-auto-tool-choice and --tool-call-parser"),
    (TOOLS, "auto", "requires --enable-auto-tool-choice and --tool-call-parser"),
])
def test_tool_choice_400s(tools: Any, choice: Any, match: str) -> None:
    with pytest.raises(BadRequest, match=match) as e:
        resolve_tool_choice(tools, choice, auto_enabled=False)
    assert e.value.status == 400 and e.value.param == "tool_choice"


def test_named_schema_is_the_tools_parameters() -> None:
    choice = ToolChoice("named", "get_weather")
    assert tool_choice_schema(TOOLS, choice) == WEATHER["function"]["parameters"]
    assert tool_choice_schema(TOOLS, ToolChoice("auto")) is None
    call = named_tool_call("get_weather", '{"city": "Oslo"}')
    assert call.function.name == "get_weather" and call.function.arguments == '{"city": "Oslo"}'


def test_required_schema_hoists_defs_and_enforces(backend: GrammarBackend,
                                                  tokenizer: Any) -> None:
    schema = tool_choice_schema(TOOLS, ToolChoice("required"))
    assert schema is not None and schema["$defs"] == {"tz": {"type": "string",
                                                             "enum": ["UTC", "CET"]}}
    assert "$defs" in TIME["function"]["parameters"]  # the request's tools are not changed
    good = [{"name": "get_weather", "parameters": {"city": "Oslo", "days": 2}},
            {"name": "get_time", "parameters": {"tz": "CET"}}]
    jsonschema.validate(good, schema)
    for bad in ([], [{"name": "get_time", "parameters": {"tz": "PST"}}],
                [{"name": "nope", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    # The grammar backend enforces the same schema: a valid output passes the matcher.
    spec = tool_choice_spec(TOOLS, ToolChoice("required"))
    assert spec is not None
    matcher = backend.new_matcher(backend.compile(spec))
    ids = tokenizer.encode(json.dumps(good), add_special_tokens=False)
    buf = backend.allocate_masks(1)
    for tok in ids:
        backend.fill_masks(buf, [matcher])
        assert (int(buf[0][tok // 32]) >> (tok % 32)) & 1
        assert matcher.consume(tok)
    assert matcher.is_accepting()
    calls = required_tool_calls(json.dumps(good))
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        (g["name"], g["parameters"]) for g in good]
    assert required_tool_calls('[{"name": "get_ti') == ()


def test_conflicting_defs_are_400() -> None:
    other = {"type": "function", "function": {"name": "g", "parameters": {
        "type": "object", "$defs": {"tz": {"type": "integer"}}}}}
    with pytest.raises(BadRequest, match="multiple schemas"):
        tool_choice_schema([*TOOLS, other], ToolChoice("required"))
