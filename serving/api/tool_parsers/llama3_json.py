"""``llama3_json``: Llama 3.1-3.3's JSON calls, ``{"name": ..., "parameters": {...}}`` (or
``"arguments"``), optionally after ``<|python_tag|>``, several separated by ``;``.

As in vLLM, an output that does not start (after whitespace) with ``{`` or the python tag is
plain content; one that does is calls only (no content)."""

from __future__ import annotations

from serving.api.tool_parsers.base import Parsed, PartialCall, ToolParser, register_tool_parser
from serving.api.tool_parsers.json_stream import scan_call_object, skip_ws

PYTHON_TAG = "<|python_tag|>"


@register_tool_parser("llama3_json")
class Llama3JsonToolParser(ToolParser):
    def _parse(self, text: str, final: bool) -> Parsed:
        pos = skip_ws(text, 0)
        head = text[pos:]
        if head.startswith(PYTHON_TAG):
            pos += len(PYTHON_TAG)
        elif not head.startswith("{"):
            undecided = not final and (not head or PYTHON_TAG.startswith(head))
            return Parsed("" if undecided else text)
        calls: list[PartialCall] = []
        while True:
            cs = scan_call_object(text, pos, final, args_keys=("parameters", "arguments"))
            calls.append(PartialCall(cs.name, cs.arguments, complete=cs.end is not None))
            if cs.error or cs.end is None:
                return Parsed("", tuple(calls), ok=not cs.error)
            pos = skip_ws(text, cs.end)
            if pos == len(text):
                return Parsed("", tuple(calls))
            if text[pos] != ";":
                return Parsed("", tuple(calls), ok=False)
            pos = skip_ws(text, pos + 1)
            if pos == len(text):
                return Parsed("", tuple(calls))  # the next call has not started yet
