"""``pythonic``: a Python list of calls with keyword arguments, ``[f(a=1, b="x"), g()]``
(Llama 3.2 and 4's pythonic style, ToolACE).

As in vLLM, an output that does not start (after whitespace) with ``[`` is plain content, and
argument values must be Python literals (``ast.literal_eval``); ``arguments`` is their JSON
object, ``json.dumps(kwargs, ensure_ascii=False)``. Streaming sends each keyword argument once
its value has ended (at the next ``,`` or ``)`` outside brackets and strings)."""

from __future__ import annotations

import ast
import json
import re

from serving.api.tool_parsers.base import Parsed, PartialCall, ToolParser, register_tool_parser
from serving.api.tool_parsers.json_stream import skip_ws

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_OPEN, _CLOSE = "([{", ")]}"


class _Incomplete(Exception):
    pass


class _Invalid(Exception):
    pass


def _value_end(text: str, pos: int) -> int:
    """Where a literal starting at ``pos`` ends: the first ``,`` or ``)`` at depth 0 outside
    strings."""
    depth, quote = 0, ""
    i = pos
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            if depth == 0:
                if c != ")":
                    raise _Invalid
                return i
            depth -= 1
        elif c == "," and depth == 0:
            return i
        i += 1
    raise _Incomplete


def _json_value(literal: str) -> str:
    try:
        return json.dumps(ast.literal_eval(literal), ensure_ascii=False)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise _Invalid from None


@register_tool_parser("pythonic")
class PythonicToolParser(ToolParser):
    def _parse(self, text: str, final: bool) -> Parsed:
        pos = skip_ws(text, 0)
        if pos == len(text):
            return Parsed(text if final else "")
        if text[pos] != "[":
            return Parsed(text)
        calls: list[PartialCall] = []
        pos = skip_ws(text, pos + 1)
        try:
            if text[pos:pos + 1] == "]":
                return Parsed("")
            while True:
                pos = self._call(text, pos, calls)
                pos = skip_ws(text, pos)
                c = text[pos:pos + 1]
                if c == ",":
                    pos = skip_ws(text, pos + 1)
                elif c == "]":
                    if text[pos + 1:].strip():
                        raise _Invalid  # text after the list: not a call list
                    return Parsed("", tuple(calls))
                elif c == "":
                    raise _Incomplete
                else:
                    raise _Invalid
        except _Incomplete:
            return Parsed("", tuple(calls), ok=not final)
        except _Invalid:
            return Parsed("", tuple(calls), ok=False)

    @staticmethod
    def _call(text: str, pos: int, calls: list[PartialCall]) -> int:
        m = _NAME.match(text, pos)
        if m is None:
            raise _Incomplete if pos == len(text) else _Invalid
        if m.end() == len(text):
            raise _Incomplete  # the name may go on
        if text[m.end()] != "(":
            raise _Invalid
        name, args = m.group(), "{"
        pos = m.end() + 1
        while True:
            pos = skip_ws(text, pos)
            if pos == len(text):
                calls.append(PartialCall(name, args))
                raise _Incomplete
            if text[pos] == ")":
                calls.append(PartialCall(name, args + "}", complete=True))
                return pos + 1
            key = _NAME.match(text, pos)
            eq = skip_ws(text, key.end()) if key else pos
            if key is None or "." in key.group() or text[eq:eq + 1] != "=":
                if eq == len(text) and key is not None:
                    calls.append(PartialCall(name, args))
                    raise _Incomplete
                raise _Invalid  # positional arguments are not calls vLLM accepts
            try:
                end = _value_end(text, eq + 1)
            except _Incomplete:
                calls.append(PartialCall(name, args))
                raise
            value = _json_value(text[eq + 1:end].strip())
            args += ("" if args == "{" else ", ") + json.dumps(key.group()) + ": " + value
            pos = end + 1 if text[end] == "," else end
