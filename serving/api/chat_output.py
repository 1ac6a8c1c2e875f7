"""A chat choice's output as the client sees it: the reasoning split first, then tools.

With ``--reasoning-parser`` the output splits into ``reasoning_content`` and ``content``
(``serving.api.reasoning``); ``include_reasoning: false`` drops the reasoning. Only the content
part reaches the tool handling (``serving.api.tool_output``: named, ``required``, ``auto``), as
vLLM does, so a tool call written inside the thinking is not a call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from serving.api.generation import new_reasoning_parser
from serving.api.reasoning import ReasoningDelta
from serving.api.tool_output import ChoiceToolStream, StreamDelta, ToolPlan, final_message


@dataclass(frozen=True)
class OutputPlan:
    """How a request's choices are shaped: its tools, the server's reasoning parser (None: no
    split) and whether the reasoning is returned."""

    tools: ToolPlan
    reasoning_parser: str | None = None
    include_reasoning: bool = True

    @property
    def plain(self) -> bool:
        """Content only: the text goes out as it comes."""
        return self.tools.mode == "none" and self.reasoning_parser is None


@dataclass(frozen=True)
class ChoiceMessage:
    content: str | None
    reasoning_content: str | None
    tool_calls: list[dict[str, Any]]
    finish_reason: str | None


def choice_message(plan: OutputPlan, text: str, finish: str | None, tokenizer: Any,
                   echo_text: str = "") -> ChoiceMessage:
    """One whole choice; ``echo_text`` is prepended to plain content (``echo``)."""
    reasoning: str | None = None
    content: str | None = text
    parser = new_reasoning_parser(plan.reasoning_parser, tokenizer)
    if parser is not None:
        split = parser.extract_reasoning(text)
        reasoning = split.reasoning if plan.include_reasoning else None
        content = split.content
    if plan.tools.mode == "none":
        if echo_text:
            content = echo_text + (content or "")
        return ChoiceMessage(content, reasoning, [], finish)
    msg = final_message(plan.tools, content or "", finish, tokenizer)
    return ChoiceMessage(msg.content, reasoning, msg.tool_calls, msg.finish_reason)


class ChoiceStream:
    """One streamed choice that is not plain: ``step`` after each delta of text, ``finish``
    after the last (what only the end completes), ``finish_reason`` for its final chunk."""

    def __init__(self, plan: OutputPlan, tokenizer: Any) -> None:
        self.plan = plan
        self.text = ""
        self._reasoning = new_reasoning_parser(plan.reasoning_parser, tokenizer)
        self._tools = None if plan.tools.mode == "none" else ChoiceToolStream(plan.tools,
                                                                             tokenizer)

    def step(self, delta_text: str) -> StreamDelta:
        previous, self.text = self.text, self.text + delta_text
        if self._reasoning is None:
            return self._content(delta_text)
        return self._split(self._reasoning.extract_reasoning_streaming(
            previous, self.text, delta_text))

    def finish(self) -> list[StreamDelta]:
        """The deltas the end of the output releases (held-back text, final fragments), in
        order; empty ones left out."""
        out = []
        if self._reasoning is not None:
            out.append(self._split(self._reasoning.finish_streaming(self.text)))
        if self._tools is not None:
            out.append(self._tools.finish())
        return [d for d in out if not d.empty]

    def finish_reason(self, engine_reason: str | None) -> str | None:
        if self._tools is None:
            return engine_reason
        return self._tools.finish_reason(engine_reason)

    def _content(self, text: str) -> StreamDelta:
        if self._tools is None:
            return StreamDelta(content=text) if text else StreamDelta()
        return self._tools.step(text)

    def _split(self, d: ReasoningDelta | None) -> StreamDelta:
        if d is None:
            return StreamDelta()
        c = self._content(d.content) if d.content else StreamDelta()
        reasoning = d.reasoning_content if self.plan.include_reasoning else None
        return StreamDelta(c.content, c.tool_calls, reasoning)
