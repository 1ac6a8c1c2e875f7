"""``qwen3_xml``: Qwen3-Coder's XML calls,
``<tool_call>\\n<function=NAME>\\n<parameter=P>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call>``.

Values are text; each is converted by the type its tool's JSON schema gives the parameter
(vLLM's rules: "null" is null; integer, number and boolean types parse, falling back to the
text; objects and arrays parse as JSON, then as a Python literal, falling back to the text;
parameters the schema does not know stay text). One newline right after ``<parameter=P>`` and one
right before ``</parameter>`` are layout, not value. Content is the text before the first
``<tool_call>``. Streaming sends a parameter once it has ended."""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping
from typing import Any

from serving.api.tool_parsers.base import (
    Parsed,
    PartialCall,
    ToolParser,
    holdback,
    register_tool_parser,
)
from serving.api.tool_parsers.json_stream import skip_ws

START, END = "<tool_call>", "</tool_call>"
FUNC, FUNC_END = "<function=", "</function>"
PARAM, PARAM_END = "<parameter=", "</parameter>"


def _param_type(tools: tuple[Mapping[str, Any], ...], func: str, param: str) -> str | None:
    for tool in tools:
        fn = tool.get("function") or {}
        if fn.get("name") != func:
            continue
        props = (fn.get("parameters") or {}).get("properties") or {}
        spec = props.get(param)
        if not isinstance(spec, dict):
            return None
        t = spec.get("type", "string")
        if isinstance(t, list):  # ["integer", "null"]: the first non-null type
            t = next((x for x in t if x != "null"), "string")
        return str(t).strip().lower()
    return None


def convert_value(raw: str, kind: str | None) -> Any:
    """A parameter's text as the value its schema type says (vLLM's conversion)."""
    if raw.lower() == "null":
        return None
    if kind is None or kind in ("string", "str", "text", "varchar", "char", "enum"):
        return raw
    if kind.startswith(("int", "uint", "long", "short", "unsigned")):
        try:
            return int(raw)
        except ValueError:
            return raw
    if kind.startswith(("num", "float")):
        try:
            f = float(raw)
        except ValueError:
            return raw
        return int(f) if f.is_integer() else f
    if kind in ("boolean", "bool", "binary"):
        return raw.lower() == "true"
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(raw)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return raw


def _waiting(rest: str, final: bool, *tags: str) -> bool:
    """``rest`` may still become one of ``tags`` as more text arrives."""
    return not final and any(t.startswith(rest) for t in tags)


@register_tool_parser("qwen3_xml")
class Qwen3XmlToolParser(ToolParser):
    def _parse(self, text: str, final: bool) -> Parsed:
        i = text.find(START)
        if i < 0:
            return Parsed(text if final else text[:len(text) - holdback(text, [START])])
        content, calls = text[:i], list[PartialCall]()
        pos = i + len(START)
        while True:
            pos = skip_ws(text, pos)
            rest = text[pos:]
            if not rest.startswith(FUNC):
                ok = _waiting(rest, final, FUNC)
                return Parsed(content, tuple(calls), ok=ok)
            close = text.find(">", pos)
            if close < 0:
                return Parsed(content, tuple(calls), ok=not final)
            name = text[pos + len(FUNC):close].strip()
            call, after = self._params(text, close + 1, final, name)
            calls.append(call)
            if after is None:
                return Parsed(content, tuple(calls), ok=not final)
            if after < 0:
                return Parsed(content, tuple(calls), ok=False)
            pos = skip_ws(text, after)
            rest = text[pos:]
            if rest.startswith(END):
                pos += len(END)
            elif not rest or _waiting(rest, final, END):
                return Parsed(content, tuple(calls))
            else:
                return Parsed(content, tuple(calls), ok=False)
            nxt = text.find(START, pos)
            if nxt < 0:
                return Parsed(content, tuple(calls))
            pos = nxt + len(START)

    def _params(self, text: str, pos: int, final: bool,
                name: str) -> tuple[PartialCall, int | None]:
        """The parameters of one function: the call, and the index past ``</function>``
        (None: not there yet; -1: malformed)."""
        parts: list[str] = []
        args = lambda closing: "{" + ", ".join(parts) + closing
        while True:
            pos = skip_ws(text, pos)
            rest = text[pos:]
            if rest.startswith(FUNC_END):
                return PartialCall(name, args("}"), complete=True), pos + len(FUNC_END)
            if not rest.startswith(PARAM):
                if not rest or _waiting(rest, final, FUNC_END, PARAM):
                    return PartialCall(name, args("")), None
                return PartialCall(name, args("")), -1
            close = text.find(">", pos)
            if close < 0:
                return PartialCall(name, args("")), None
            param = text[pos + len(PARAM):close].strip()
            start = close + 1
            # The value ends at </parameter>, or (a model that forgot it) at the next tag.
            ends = [e for e in (text.find(PARAM_END, start), text.find(PARAM, start),
                                text.find(FUNC_END, start)) if e >= 0]
            if not ends:
                return PartialCall(name, args("")), None
            end = min(ends)
            raw = text[start:end]
            raw = raw[1:] if raw.startswith("\n") else raw
            raw = raw[:-1] if raw.endswith("\n") else raw
            value = convert_value(raw, _param_type(self.tools, name, param))
            parts.append(json.dumps(param, ensure_ascii=False) + ": "
                         + json.dumps(value, ensure_ascii=False))
            pos = end + len(PARAM_END) if text.startswith(PARAM_END, end) else end
