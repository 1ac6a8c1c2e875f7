"""configs/chat_templates/smollm2-tools.jinja through the project's sandboxed renderer: without
tools it is SmolLM2's own template; with tools, a Hermes-style tools section whose calls the
hermes parser reads back."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from serving.api.chat_template import ChatRenderer, detect_content_format
from serving.api.tool_parsers import get_tool_parser

TEMPLATE = (Path(__file__).resolve().parents[2] / "configs" / "chat_templates"
            / "smollm2-tools.jinja").read_text()
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]
CALLS = [{"id": "chatcmpl-tool-1", "type": "function",
          "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
         {"id": "chatcmpl-tool-2", "type": "function",
          "function": {"name": "get_time", "arguments": "{}"}}]


@pytest.fixture(scope="module")
def renderer() -> ChatRenderer:
    return ChatRenderer(TEMPLATE)


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
])
def test_without_tools_it_is_smollm2s_template(renderer: ChatRenderer, tokenizer: Any,
                                               messages: list[dict[str, Any]]) -> None:
    ours = renderer.render_sync(messages, add_generation_prompt=True)
    own = ChatRenderer(tokenizer.chat_template).render_sync(messages, add_generation_prompt=True)
    assert ours == own
    assert detect_content_format(TEMPLATE) == "string"


def test_tools_section_and_a_round_trip(renderer: ChatRenderer) -> None:
    messages = [
        {"role": "user", "content": "Weather and time in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": CALLS},
        {"role": "tool", "tool_call_id": "chatcmpl-tool-1", "content": "18 C, sunny"},
        {"role": "tool", "tool_call_id": "chatcmpl-tool-2", "content": "14:05"},
    ]
    out = renderer.render_sync(messages, tools=TOOLS, add_generation_prompt=True)
    assert out.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    listed = re.search(r"<tools>\n(.*)\n</tools>", out, re.DOTALL)
    assert listed is not None
    assert [json.loads(line) for line in listed.group(1).split("\n")] == TOOLS
    # The assistant turn's calls read back with the hermes parser.
    turn = out.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    parsed = get_tool_parser("hermes")().extract_tool_calls(turn)
    assert parsed.tools_called and parsed.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in parsed.tool_calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]
    # Consecutive tool results share one user turn.
    assert ("<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response>\n"
            "<tool_response>\n14:05\n</tool_response><|im_end|>\n") in out
    assert out.endswith("<|im_start|>assistant\n")


def test_a_system_message_replaces_the_default_once(renderer: ChatRenderer) -> None:
    out = renderer.render_sync([{"role": "system", "content": "You are terse."},
                                {"role": "user", "content": "Hi"}], tools=TOOLS)
    assert out.startswith("<|im_start|>system\nYou are terse.\n\n# Tools\n")
    assert out.count("<|im_start|>system") == 1 and "SmolLM" not in out
