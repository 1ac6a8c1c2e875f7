"""Tools on the chat route: what a request's ``tools`` / ``tool_choice`` ask for, and how each
choice's output becomes ``tool_calls`` (whole, or as stream deltas), with vLLM's shapes.

- ``none``: plain content (the tools may still be shown to the template, unless
  ``--exclude-tools-when-tool-choice-none``).
- named (``{"type": "function", "function": {"name": N}}``): the output is constrained to N's
  parameters schema and is the arguments of one call; ``content`` is ""; the finish reason is
  the engine's. Streamed as the output's own text, fragment by fragment.
- ``required``: the output is constrained to a non-empty array of ``{"name", "parameters"}``;
  each element is a call; ``finish_reason`` is "tool_calls" when the output stopped.
- ``auto``: the server's ``--tool-call-parser`` reads calls out of free text; "tool_calls"
  whenever it found some.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from serving.api.args import ServerArgs
from serving.api.tool_parsers import ToolCall, ToolParser, get_tool_parser, make_tool_call_id
from serving.api.tool_parsers.base import DeltaMessage as ParserDelta
from serving.api.tool_parsers.base import Parsed, PartialCall
from serving.api.tool_parsers.json_stream import scan_call_object, skip_ws
from serving.api.tool_parsers.tool_choice import (
    ToolChoice,
    named_tool_call,
    required_tool_calls,
    resolve_tool_choice,
    tool_choice_spec,
    validate_tools,
)
from serving.engine.sampling_params import StructuredSpec


@dataclass(frozen=True)
class ToolPlan:
    """A chat request's tools, resolved once: ``template_tools`` go to the chat template
    (None: none shown); ``parser``: the ``--tool-call-parser`` name, for ``auto``."""

    choice: ToolChoice
    tools: tuple[Mapping[str, Any], ...] = ()
    template_tools: list[dict[str, Any]] | None = None
    parser: str | None = None

    @property
    def mode(self) -> str:
        return self.choice.mode


def plan_tools(tools: Any, tool_choice: Any, args: ServerArgs
               ) -> tuple[ToolPlan, StructuredSpec | None]:
    """The request's tool plan and the constraint that enforces it (named and ``required``:
    a JSON schema; None otherwise). 400s as vLLM gives them (``resolve_tool_choice``)."""
    given = validate_tools(tools) if tools is not None else None
    choice = resolve_tool_choice(given, tool_choice,
                                 auto_enabled=args.enable_auto_tool_choice
                                 and args.tool_call_parser is not None)
    defs = list(given or [])
    shown = None if not defs or (choice.mode == "none"
                                 and args.exclude_tools_when_tool_choice_none) else defs
    spec = tool_choice_spec(defs, choice) if choice.mode in ("named", "required") else None
    return ToolPlan(choice, tuple(defs), shown, args.tool_call_parser), spec


def call_dict(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": call.type,
            "function": {"name": call.function.name, "arguments": call.function.arguments}}


@dataclass(frozen=True)
class FinalMessage:
    content: str | None
    tool_calls: list[dict[str, Any]]
    finish_reason: str | None


def final_message(plan: ToolPlan, text: str, finish: str | None, tokenizer: Any
                  ) -> FinalMessage:
    """One whole choice as a chat message (``text``: its content after reasoning, if any)."""
    if plan.mode == "named":
        assert plan.choice.name is not None
        return FinalMessage("", [call_dict(named_tool_call(plan.choice.name, text))], finish)
    if plan.mode == "required":
        calls = required_tool_calls(text)
        if not calls:  # cut short (max_tokens, a stop string): what there is, as content
            return FinalMessage(text, [], finish)
        return FinalMessage("", [call_dict(c) for c in calls],
                            "tool_calls" if finish == "stop" else finish)
    if plan.mode == "auto":
        assert plan.parser is not None
        parser = get_tool_parser(plan.parser)(tokenizer, plan.tools)
        found = parser.extract_tool_calls(text)
        if found.tools_called:
            return FinalMessage(found.content, [call_dict(c) for c in found.tool_calls],
                                "tool_calls")
    return FinalMessage(text, [], finish)


class RequiredCallsParser(ToolParser):
    """A ``required`` choice's output as it streams: ``[{"name": ..., "parameters": {...}},
    ...]`` (what its schema allows); the arguments are the canonical JSON of ``parameters``, as
    ``required_tool_calls`` writes them for the whole output."""

    def _parse(self, text: str, final: bool) -> Parsed:
        pos = skip_ws(text, 0)
        if pos == len(text):
            return Parsed("")
        if text[pos] != "[":
            return Parsed("", ok=False)
        calls: list[PartialCall] = []
        pos = skip_ws(text, pos + 1)
        while pos < len(text):
            cs = scan_call_object(text, pos, final, args_keys=("parameters",))
            calls.append(PartialCall(cs.name, cs.arguments, complete=cs.end is not None))
            if cs.error or cs.end is None:
                return Parsed("", tuple(calls), ok=not cs.error)
            pos = skip_ws(text, cs.end)
            if pos < len(text) and text[pos] == "]":
                break
            if pos < len(text) and text[pos] != ",":
                return Parsed("", tuple(calls), ok=False)
            pos = skip_ws(text, pos + 1)
        return Parsed("", tuple(calls))


@dataclass(frozen=True)
class StreamDelta:
    """What one step adds to a streamed choice: reasoning, content and ``tool_calls`` pieces
    (OpenAI's delta shape: index, then id/type/name on a call's first piece)."""

    content: str | None = None
    tool_calls: tuple[dict[str, Any], ...] = ()
    reasoning_content: str | None = None

    @property
    def empty(self) -> bool:
        return self.content is None and not self.tool_calls and self.reasoning_content is None


class ChoiceToolStream:
    """One streamed choice's tool calls (``plan.mode`` other than none): ``step`` after each
    delta of text, ``finish`` after the last, ``finish_reason`` for its final chunk."""

    def __init__(self, plan: ToolPlan, tokenizer: Any) -> None:
        self.plan = plan
        self.text = ""
        self._named_id: str | None = None
        self._parser: ToolParser | None = None
        if plan.mode == "required":
            self._parser = RequiredCallsParser(tokenizer, plan.tools)
        elif plan.mode == "auto":
            assert plan.parser is not None
            self._parser = get_tool_parser(plan.parser)(tokenizer, plan.tools)

    def step(self, delta_text: str) -> StreamDelta:
        previous, self.text = self.text, self.text + delta_text
        if self._parser is None:  # named: the output is the arguments, sent as it comes
            if not delta_text:
                return StreamDelta()
            function: dict[str, Any] = {"arguments": delta_text}
            piece: dict[str, Any] = {"index": 0, "function": function}
            if self._named_id is None:
                self._named_id = make_tool_call_id()
                piece.update(id=self._named_id, type="function")
                function["name"] = self.plan.choice.name
            return StreamDelta(tool_calls=(piece,))
        return _convert(self._parser.extract_tool_calls_streaming(previous, self.text,
                                                                  delta_text))

    def finish(self) -> StreamDelta:
        """The final fragment (what only the end of the output completes)."""
        if self._parser is None:
            return StreamDelta()
        return _convert(self._parser.finish_streaming(self.text))

    def finish_reason(self, engine_reason: str | None) -> str | None:
        called = self._parser is not None and self._parser.streamed_tool_calls > 0
        if self.plan.mode == "auto" and called:
            return "tool_calls"
        if self.plan.mode == "required" and called and engine_reason == "stop":
            return "tool_calls"
        return engine_reason


def _convert(d: ParserDelta | None) -> StreamDelta:
    if d is None:
        return StreamDelta()
    pieces = []
    for t in d.tool_calls:
        function: dict[str, Any] = {}
        if t.function.name is not None:
            function["name"] = t.function.name
        if t.function.arguments is not None:
            function["arguments"] = t.function.arguments
        piece: dict[str, Any] = {"index": t.index, "function": function}
        if t.id is not None:
            piece.update(id=t.id, type=t.type or "function")
        pieces.append(piece)
    return StreamDelta(d.content, tuple(pieces))
