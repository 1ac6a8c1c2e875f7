"""Reasoning parsers (serving/api/reasoning/): golden splits, non-streaming and fed token by
token with the SmolLM2 tokenizer (its vocabulary has no think tokens, so the markers arrive in
pieces); streamed reasoning and content concatenate to exactly the non-streamed split."""

from __future__ import annotations

from typing import Any

import pytest

from serving.api.reasoning import (
    ReasoningDelta,
    ReasoningParser,
    Split,
    get_reasoning_parser,
    reasoning_parser_names,
)

# (parser, output, reasoning, content)
GOLDEN: list[tuple[str, str, str | None, str | None]] = [
    ("deepseek_r1", "<think>Two plus two.\nIt is 4.</think>\n\nThe answer is 4.",
     "Two plus two.\nIt is 4.", "\n\nThe answer is 4."),
    ("deepseek_r1", "No opening tag, straight in.</think>Answer.", "No opening tag, straight in.",
     "Answer."),
    ("deepseek_r1", "<think>Cut off while thinking about </thi",
     "Cut off while thinking about </thi", None),
    ("deepseek_r1", "<think>Done.</think>", "Done.", None),
    ("deepseek_r1", "Text then <think>inner</think>after", "Text then <think>inner", "after"),
    ("qwen3", "<think>\nLet me think: é 東京.\n</think>\n\nParis.", "\nLet me think: é 東京.\n",
     "\n\nParis."),
    ("qwen3", "Plain answer with </think> inside.", None, "Plain answer with </think> inside."),
    ("qwen3", "<think>Never closed <", "Never closed <", None),
    ("qwen3", "<thinking is not the tag", None, "<thinking is not the tag"),
]


def parser(name: str, tokenizer: Any) -> ReasoningParser:
    return get_reasoning_parser(name)(tokenizer)


def stream(p: ReasoningParser, tokenizer: Any, text: str) -> list[ReasoningDelta]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas, previous = [], ""
    for k in range(1, len(ids) + 1):
        current = tokenizer.decode(ids[:k])
        if current.endswith("\ufffd"):  # the detokenizer holds back a split character
            continue
        d = p.extract_reasoning_streaming(previous, current, current[len(previous):],
                                          ids[:k - 1], ids[:k], ids[k - 1:k])
        previous = current
        if d is not None:
            deltas.append(d)
    assert previous == text
    final = p.finish_streaming(text)
    return [*deltas, final] if final is not None else deltas


def test_registry() -> None:
    assert {"deepseek_r1", "qwen3"} <= set(reasoning_parser_names())
    with pytest.raises(KeyError, match=r"valid names: deepseek_r1, qwen3"):
        get_reasoning_parser("granite")


@pytest.mark.parametrize(("name", "text", "reasoning", "content"), GOLDEN)
def test_golden(name: str, text: str, reasoning: str | None, content: str | None,
                tokenizer: Any) -> None:
    assert parser(name, tokenizer).extract_reasoning(text) == Split(reasoning, content)


@pytest.mark.parametrize(("name", "text", "reasoning", "content"), GOLDEN)
def test_streaming_equals_non_streaming(name: str, text: str, reasoning: str | None,
                                        content: str | None, tokenizer: Any) -> None:
    deltas = stream(parser(name, tokenizer), tokenizer, text)
    assert "".join(d.reasoning_content or "" for d in deltas) == (reasoning or "")
    assert "".join(d.content or "" for d in deltas) == (content or "")
    assert all(d.reasoning_content or d.content for d in deltas)  # no empty deltas
    if "</th" not in (reasoning or ""):  # pieces of the end marker never leak into a delta
        assert not any("</th" in (d.reasoning_content or "") for d in deltas)


def test_reasoning_streams_before_it_ends(tokenizer: Any) -> None:
    text = "<think>" + "step by step, " * 5 + "</think>ok"
    deltas = stream(parser("qwen3", tokenizer), tokenizer, text)
    assert sum(1 for d in deltas if d.reasoning_content) > 5
    assert deltas[-1].content == "ok"


class OneTokenThinks:
    """A tokenizer whose vocabulary has the think markers as single tokens (ids 1, 2)."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return {"<think>": [1], "</think>": [2]}.get(text, [9, 9])


@pytest.mark.parametrize("name", ["deepseek_r1", "qwen3"])
def test_is_reasoning_end(name: str, tokenizer: Any) -> None:
    by_id = get_reasoning_parser(name)(OneTokenThinks())
    assert (by_id.start_token_id, by_id.end_token_id) == (1, 2)
    assert by_id.is_reasoning_end([1, 5, 2, 7])
    assert not by_id.is_reasoning_end([1, 5, 7])
    assert not by_id.is_reasoning_end([2, 1, 5])  # a new thought opened after the last end
    by_text = parser(name, tokenizer)
    assert by_text.end_token_id is None  # SmolLM2 spells the markers in several tokens
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)
    assert by_text.is_reasoning_end(enc("<think>hm</think>{"))
    assert not by_text.is_reasoning_end(enc("<think>hm"))
