"""A chat choice's shaping without a model: the reasoning split first, then tools on the content
only. Streams are fed a few characters at a time; their pieces must concatenate to exactly the
whole message."""

from __future__ import annotations

import json
from typing import Any

import pytest

from serving.api.args import ServerArgs
from serving.api.chat_output import ChoiceStream, OutputPlan, choice_message
from serving.api.tool_output import plan_tools

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
AUTO = ServerArgs(enable_auto_tool_choice=True, tool_call_parser="hermes")
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
FAKE = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'


def plan(parser: str | None, tool_choice: Any = None, include: bool = True) -> OutputPlan:
    tools, _ = plan_tools(TOOLS if tool_choice else None, tool_choice, AUTO)
    return OutputPlan(tools, parser, include)


def streamed(p: OutputPlan, text: str, size: int) -> dict[str, Any]:
    cs = ChoiceStream(p, None)
    deltas = [cs.step(text[i:i + size]) for i in range(0, len(text), size)] + cs.finish()
    out: dict[str, Any] = {"reasoning": None, "content": None, "args": {}}
    for d in deltas:
        if d.reasoning_content is not None:
            out["reasoning"] = (out["reasoning"] or "") + d.reasoning_content
        if d.content is not None:
            out["content"] = (out["content"] or "") + d.content
        for piece in d.tool_calls:
            args = out["args"]
            args[piece["index"]] = args.get(piece["index"], "") + \
                (piece["function"].get("arguments") or "")
    out["finish"] = cs.finish_reason("stop")
    return out


@pytest.mark.parametrize("size", [1, 3, 17])
def test_a_call_inside_the_thinking_is_not_a_call(size: int) -> None:
    text = f"<think>maybe {FAKE}? no.</think>\n{CALL}"
    p = plan("deepseek_r1", "auto")
    whole = choice_message(p, text, "stop", None)
    assert whole.reasoning_content == f"maybe {FAKE}? no."
    assert [json.loads(c["function"]["arguments"]) for c in whole.tool_calls] == \
        [{"city": "Paris"}]
    assert whole.finish_reason == "tool_calls"
    s = streamed(p, text, size)
    assert s["reasoning"] == whole.reasoning_content
    assert [json.loads(a) for a in s["args"].values()] == [{"city": "Paris"}]
    assert (s["content"] or "").strip() == (whole.content or "").strip()
    assert s["finish"] == "tool_calls"


@pytest.mark.parametrize("size", [1, 4])
@pytest.mark.parametrize("parser, text, reasoning, content", [
    ("deepseek_r1", "<think>a plan</think>The answer.", "a plan", "The answer."),
    ("deepseek_r1", "still thinking", "still thinking", None),
    ("qwen3", "<think>a plan</think>The answer.", "a plan", "The answer."),
    ("qwen3", "No thinking here.", None, "No thinking here."),
])
def test_plain_content_after_reasoning(size: int, parser: str, text: str,
                                       reasoning: str | None, content: str | None) -> None:
    whole = choice_message(plan(parser), text, "stop", None)
    assert (whole.reasoning_content, whole.content) == (reasoning, content)
    s = streamed(plan(parser), text, size)
    assert (s["reasoning"], s["content"]) == (reasoning, content)
    hidden = choice_message(plan(parser, include=False), text, "stop", None)
    assert (hidden.reasoning_content, hidden.content) == (None, content)
    s = streamed(plan(parser, include=False), text, size)
    assert (s["reasoning"], s["content"]) == (None, content)
