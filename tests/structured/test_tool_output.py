"""Tool choices on the chat route without a model: the plan (defaults, 400s, what the template
sees), whole messages, and streams fed a character or a chunk at a time, whose pieces must
concatenate to exactly the whole message's calls."""

from __future__ import annotations

import json
from typing import Any

import pytest

from serving.api.args import ServerArgs
from serving.api.errors import BadRequest
from serving.api.tool_output import ChoiceToolStream, final_message, plan_tools

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "get_time"}}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
AUTO = ServerArgs(enable_auto_tool_choice=True, tool_call_parser="hermes")


def stream(plan_choice: Any, text: str, size: int, finish: str = "stop",
           args: ServerArgs = AUTO) -> tuple[str, list[dict[str, Any]], str | None]:
    """Feed ``text`` in pieces of ``size``; returns (content, calls, finish_reason)."""
    plan, _ = plan_tools(TOOLS, plan_choice, args)
    ts = ChoiceToolStream(plan, None)
    content = ""
    calls: dict[int, dict[str, Any]] = {}
    deltas = [ts.step(text[i:i + size]) for i in range(0, len(text), size)] + [ts.finish()]
    for d in deltas:
        content += d.content or ""
        for piece in d.tool_calls:
            call = calls.setdefault(piece["index"], {"name": "", "arguments": "", "ids": []})
            if "id" in piece:
                call["ids"].append(piece["id"])
            call["name"] += piece["function"].get("name") or ""
            call["arguments"] += piece["function"].get("arguments") or ""
    return content, [calls[i] for i in sorted(calls)], ts.finish_reason(finish)


def test_plan_defaults_template_tools_and_constraints() -> None:
    plan, spec = plan_tools(TOOLS, None, AUTO)
    assert plan.mode == "auto" and spec is None and plan.template_tools == TOOLS
    plan, spec = plan_tools(None, None, ServerArgs())
    assert plan.mode == "none" and spec is None and plan.template_tools is None
    plan, spec = plan_tools(TOOLS, "none", ServerArgs(exclude_tools_when_tool_choice_none=True))
    assert plan.mode == "none" and plan.template_tools is None
    plan, _ = plan_tools(TOOLS, "none", ServerArgs())
    assert plan.template_tools == TOOLS
    plan, spec = plan_tools(TOOLS, NAMED, ServerArgs())
    assert plan.mode == "named" and spec is not None and spec.kind == "json"
    assert json.loads(str(spec.spec)) == TOOLS[0]["function"]["parameters"]
    plan, spec = plan_tools(TOOLS, "required", ServerArgs())
    assert spec is not None and json.loads(str(spec.spec))["type"] == "array"
    with pytest.raises(BadRequest, match="--enable-auto-tool-choice"):
        plan_tools(TOOLS, None, ServerArgs())


def test_named_whole_and_streamed() -> None:
    plan, _ = plan_tools(TOOLS, NAMED, ServerArgs())
    args = '{"city": "Paris"}'
    msg = final_message(plan, args, "stop", None)
    assert msg.content == "" and msg.finish_reason == "stop"
    (call,) = msg.tool_calls
    assert call["function"] == {"name": "get_weather", "arguments": args}
    for size in (1, 4, 100):
        content, calls, finish = stream(NAMED, args, size, args=ServerArgs())
        assert content == "" and finish == "stop"
        assert calls == [{"name": "get_weather", "arguments": args, "ids": calls[0]["ids"]}]
        assert len(calls[0]["ids"]) == 1


REQUIRED_OUT = ('[{"name": "get_weather", "parameters": {"city": "Paris \\u00e9"}}, '
                '{"name":"get_time","parameters":{}}]')


def test_required_whole_and_streamed_agree() -> None:
    plan, _ = plan_tools(TOOLS, "required", ServerArgs())
    msg = final_message(plan, REQUIRED_OUT, "stop", None)
    assert msg.finish_reason == "tool_calls" and msg.content == ""
    whole = [(c["function"]["name"], c["function"]["arguments"]) for c in msg.tool_calls]
    assert [n for n, _ in whole] == ["get_weather", "get_time"]
    for size in (1, 3, 1000):
        content, calls, finish = stream("required", REQUIRED_OUT, size, args=ServerArgs())
        assert finish == "tool_calls" and content == ""
        assert [(c["name"], c["arguments"]) for c in calls] == whole
        assert all(len(c["ids"]) == 1 for c in calls)
    cut = final_message(plan, REQUIRED_OUT[:30], "length", None)  # cut short: no calls
    assert cut.tool_calls == [] and cut.content == REQUIRED_OUT[:30]
    assert cut.finish_reason == "length"
    assert stream("required", REQUIRED_OUT, 5, finish="length")[2] == "length"


def test_auto_parses_calls_out_of_free_text() -> None:
    plan, _ = plan_tools(TOOLS, None, AUTO)
    text = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n' \
           '</tool_call>'
    msg = final_message(plan, text, "stop", None)
    assert msg.finish_reason == "tool_calls" and msg.content == "Let me check."
    assert msg.tool_calls[0]["function"] == {"name": "get_weather",
                                             "arguments": '{"city": "Oslo"}'}
    for size in (1, 7):
        content, calls, finish = stream(None, text, size)
        assert (content, finish) == ("Let me check.", "tool_calls")
        assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather",
                                                                 '{"city": "Oslo"}')]
    plain = final_message(plan, "It is sunny.", "stop", None)
    assert (plain.content, plain.tool_calls, plain.finish_reason) == ("It is sunny.", [], "stop")
    assert stream(None, "It is sunny.", 2) == ("It is sunny.", [], "stop")
