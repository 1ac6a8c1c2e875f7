"""``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, repeatable (Hermes
2/3, Qwen2.5, Qwen3 and the SmolLM2 tools template in configs/chat_templates/).

Content is the text before the first ``<tool_call>``; text after the calls is dropped, as vLLM
does. The last call may lack its ``</tool_call>`` (the output stopped right after the JSON)."""

from __future__ import annotations

from serving.api.tool_parsers.base import (
    Parsed,
    PartialCall,
    ToolParser,
    holdback,
    register_tool_parser,
)
from serving.api.tool_parsers.json_stream import scan_call_object, skip_ws

START, END = "<tool_call>", "</tool_call>"


def parse_tagged_json_calls(text: str, final: bool, start: str, end: str) -> Parsed:
    """Calls as JSON objects between ``start`` and ``end`` markers; content before the first."""
    i = text.find(start)
    if i < 0:
        return Parsed(text if final else text[:len(text) - holdback(text, [start])])
    content, calls, pos = text[:i], [], i + len(start)
    while True:
        cs = scan_call_object(text, pos, final)
        call = PartialCall(cs.name, cs.arguments, complete=cs.end is not None)
        calls.append(call)
        if cs.error:
            return Parsed(content, tuple(calls), ok=False)
        if cs.end is None:
            return Parsed(content, tuple(calls))
        pos = skip_ws(text, cs.end)
        rest = text[pos:]
        if rest.startswith(end):
            pos += len(end)
        elif not rest or (not final and end.startswith(rest)):
            return Parsed(content, tuple(calls))  # the end marker is missing or still arriving
        else:
            return Parsed(content, tuple(calls), ok=False)
        nxt = text.find(start, pos)
        if nxt < 0:
            return Parsed(content, tuple(calls))
        pos = nxt + len(start)


@register_tool_parser("hermes")
class HermesToolParser(ToolParser):
    def _parse(self, text: str, final: bool) -> Parsed:
        return parse_tagged_json_calls(text, final, START, END)
