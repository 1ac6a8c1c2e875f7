"""Reasoning end to end: ``serve --reasoning-parser deepseek_r1`` on SmolLM2 with the official
``openai`` client. SmolLM2 is not a thinking model, but asked for "an XML element named think"
it writes ``<think>Hello</think>`` and goes on, greedily, which is what the parser and the
grammar gate read: the text up to ``</think>`` is the reasoning, and a request's grammar
applies only after it (vLLM's rule). The free run of the same prompt is the reference for the
reasoning part.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.api.server_utils import REPO, ServerProcess, real_server, repo_env

NAME = "smollm2"
THINKER = [{"role": "user",
            "content": "Write an XML element named think containing the word hello."}]
CHOICES = ["yes", "no"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("reasoning")
    s = real_server(tmp, "--max-model-len", "512", "--max-num-seqs", "4",
                    "--served-model-name", NAME, "--reasoning-parser", "deepseek_r1",
                    name="reasoning").start(900)
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def free(client: openai.OpenAI) -> Any:
    """The unconstrained greedy answer: reasoning up to ``</think>``, content after it."""
    r = client.chat.completions.create(model=NAME, messages=THINKER, temperature=0,
                                       max_tokens=60)
    msg = r.choices[0].message
    assert msg.reasoning_content  # type: ignore[attr-defined]
    assert msg.content and "</think>" not in msg.content
    return msg


def test_grammar_applies_after_the_reasoning(client: openai.OpenAI, free: Any) -> None:
    r = client.chat.completions.create(model=NAME, messages=THINKER, temperature=0,
                                       max_tokens=60, extra_body={"guided_choice": CHOICES})
    msg = r.choices[0].message
    assert msg.reasoning_content == free.reasoning_content  # type: ignore[attr-defined]
    assert msg.content in CHOICES
    assert r.choices[0].finish_reason == "stop"


def test_streamed_reasoning_and_content_equal_the_whole(client: openai.OpenAI, free: Any
                                                        ) -> None:
    reasoning, content, finishes = [], [], []
    for chunk in client.chat.completions.create(
            model=NAME, messages=THINKER, temperature=0, max_tokens=60, stream=True,
            extra_body={"guided_choice": CHOICES}):
        for c in chunk.choices:
            d = c.delta.model_dump()
            reasoning.append(d.get("reasoning_content") or "")
            content.append(d.get("content") or "")
            finishes.append(c.finish_reason)
    assert "".join(reasoning) == free.reasoning_content
    assert "".join(content) in CHOICES
    assert [f for f in finishes if f] == ["stop"]


def test_include_reasoning_false_drops_it(client: openai.OpenAI, free: Any) -> None:
    r = client.chat.completions.create(model=NAME, messages=THINKER, temperature=0,
                                       max_tokens=60, extra_body={"include_reasoning": False})
    msg = r.choices[0].message
    assert getattr(msg, "reasoning_content", None) is None
    assert msg.content == free.content
    chunks = list(client.chat.completions.create(
        model=NAME, messages=THINKER, temperature=0, max_tokens=60, stream=True,
        extra_body={"include_reasoning": False}))
    assert all(not (c.delta.model_dump().get("reasoning_content")) for ch in chunks
               for c in ch.choices)
    assert "".join(c.delta.content or "" for ch in chunks for c in ch.choices) == free.content


def test_named_tool_call_is_read_from_the_content_only(client: openai.OpenAI, free: Any
                                                       ) -> None:
    params = {"type": "object", "properties": {"word": {"type": "string", "maxLength": 12}},
              "required": ["word"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "say", "parameters": params}}]
    r = client.chat.completions.create(
        model=NAME, messages=THINKER, temperature=0, max_tokens=80, tools=tools,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "say"}})
    msg = r.choices[0].message
    assert msg.reasoning_content == free.reasoning_content  # type: ignore[attr-defined]
    assert msg.tool_calls and msg.tool_calls[0].function.name == "say"  # type: ignore[union-attr]
    jsonschema.validate(json.loads(msg.tool_calls[0].function.arguments), params)  # type: ignore[union-attr]


def test_completions_gate_on_the_output_and_on_the_prompt(client: openai.OpenAI) -> None:
    """The gate is the engine's, on both routes. A prompt that leaves a ``<think>`` open: the
    model closes it (free), then the grammar applies. A prompt whose reasoning already ended:
    the grammar applies from the first token."""
    opened = "<think>hello</think>\n<think>world</think>\n<think>sky"
    free = client.completions.create(model=NAME, prompt=opened, temperature=0, max_tokens=8)
    assert free.choices[0].text.startswith("</think>")
    r = client.completions.create(model=NAME, prompt=opened, temperature=0, max_tokens=20,
                                  extra_body={"guided_choice": CHOICES})
    assert r.choices[0].text in [f"</think>{c}" for c in CHOICES]
    closed = "Is the sky blue?\n<think>It is.</think>\n"
    r = client.completions.create(model=NAME, prompt=closed, temperature=0, max_tokens=20,
                                  extra_body={"guided_choice": CHOICES})
    assert r.choices[0].text in CHOICES


def test_the_grammar_cache_metric_counts_what_was_compiled(server: ServerProcess) -> None:
    text = httpx.get(server.base_url + "/metrics").text
    line = next(x for x in text.splitlines() if x.startswith("xlaserve:grammar_cache_size"))
    assert float(line.rsplit(" ", 1)[1]) >= 2  # guided_choice and the named tool's schema


def test_docs_example_runs_as_written(server: ServerProcess, free: Any) -> None:
    """docs/STRUCTURED.md's reasoning example (its third Python block) against this server."""
    code = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "STRUCTURED.md").read_text(),
                      flags=re.S)[2]
    out = subprocess.run([sys.executable, "-c",
                          code.replace("http://localhost:8000", server.base_url)],
                         capture_output=True, text=True, env=repo_env(), timeout=300)
    assert out.returncode == 0, out.stderr
    reasoning, content = out.stdout.splitlines()
    assert reasoning == repr(free.reasoning_content)
    assert content in CHOICES
