"""``mistral``: ``[TOOL_CALLS]`` then either a JSON list of ``{"name", "arguments"}`` objects
(tokenizers before v11) or ``name{arguments}``, repeated after further ``[TOOL_CALLS]`` (v11+).

Content is the text before the first ``[TOOL_CALLS]``. Ids are 9 alphanumeric characters, the
only form Mistral's chat templates accept back."""

from __future__ import annotations

from serving.api.tool_parsers.base import (
    Parsed,
    PartialCall,
    ToolParser,
    holdback,
    make_mistral_tool_call_id,
    register_tool_parser,
)
from serving.api.tool_parsers.json_stream import scan_call_object, scan_json, skip_ws

BOT = "[TOOL_CALLS]"


def _json_list(text: str, pos: int, final: bool, content: str) -> Parsed:
    calls: list[PartialCall] = []
    pos = skip_ws(text, pos + 1)  # past "["
    if text[pos:pos + 1] == "]":
        return Parsed(content)
    while True:
        cs = scan_call_object(text, pos, final)
        calls.append(PartialCall(cs.name, cs.arguments, complete=cs.end is not None))
        if cs.error or cs.end is None:
            return Parsed(content, tuple(calls), ok=not cs.error)
        pos = skip_ws(text, cs.end)
        c = text[pos:pos + 1]
        if c == ",":
            pos = skip_ws(text, pos + 1)
        elif c == "]" or (c == "" and not final):
            return Parsed(content, tuple(calls))
        else:
            return Parsed(content, tuple(calls), ok=False)


def _named_calls(text: str, pos: int, final: bool, content: str) -> Parsed:
    calls: list[PartialCall] = []
    while True:
        brace = text.find("{", pos)
        if brace < 0:
            # The name is still arriving (or the output stopped inside it).
            return Parsed(content, tuple(calls), ok=not final)
        name = text[pos:brace].strip()
        if not name or any(ch in name for ch in ' \t\n"[]{}'):
            return Parsed(content, tuple(calls), ok=False)
        sc = scan_json(text, brace, final)
        calls.append(PartialCall(name, sc.text, complete=sc.end is not None))
        if sc.error or sc.end is None:
            return Parsed(content, tuple(calls), ok=not sc.error)
        pos = skip_ws(text, sc.end)
        if not text.startswith(BOT, pos):
            return Parsed(content, tuple(calls))
        pos = skip_ws(text, pos + len(BOT))


@register_tool_parser("mistral")
class MistralToolParser(ToolParser):
    def new_tool_call_id(self) -> str:
        return make_mistral_tool_call_id()

    def _parse(self, text: str, final: bool) -> Parsed:
        i = text.find(BOT)
        if i < 0:
            return Parsed(text if final else text[:len(text) - holdback(text, [BOT])])
        content = text[:i]
        pos = skip_ws(text, i + len(BOT))
        if pos == len(text):
            return Parsed(content, ok=not final)
        if text[pos] == "[":
            return _json_list(text, pos, final, content)
        return _named_calls(text, pos, final, content)
