"""Reasoning parsers: a thinking model's output → ``reasoning_content`` and ``content``.

vLLM's ``--reasoning-parser`` contract: ``extract_reasoning`` splits a whole output;
``extract_reasoning_streaming`` turns each step into a delta of reasoning and/or content (None:
nothing to send this step); ``finish_streaming`` flushes what was held back. The route applies
``include_reasoning`` and hands only the content to a tool parser.

The markers (``<think>``, ``</think>``) are matched as text, so they work whether the tokenizer
has them as single tokens (DeepSeek-R1, Qwen3) or not. As with the tool parsers, each format is
one function of the whole text so far (``_split``), and the base class sends only what is new,
so streamed reasoning and content concatenate to exactly the non-streamed split. A text that ends
in what may be the start of a marker is held back until the next step says.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from serving.api.registry import Registry
from serving.api.tool_parsers.base import holdback


@dataclass(frozen=True)
class ReasoningDelta:
    reasoning_content: str | None = None
    content: str | None = None


@dataclass(frozen=True)
class Split:
    """``reasoning``/``content`` of a text; None when the output has no such part."""

    reasoning: str | None
    content: str | None


class ReasoningParser(ABC):
    """Base of the ``<think>...</think>`` formats. One instance per choice (streaming state)."""

    start_token = "<think>"
    end_token = "</think>"

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer
        self._sent_reasoning = 0
        self._sent_content = 0
        ids = _single_token_id(tokenizer, self.end_token), _single_token_id(tokenizer,
                                                                             self.start_token)
        self.end_token_id, self.start_token_id = ids

    @abstractmethod
    def _split(self, text: str, final: bool) -> Split:
        """The split of ``text``; with ``final=False`` both parts must be prefixes of those
        with ``final=True`` for any continuation of the text."""

    def extract_reasoning(self, text: str) -> Split:
        """The split of a whole output (vLLM's ``extract_reasoning_content``); "" → None."""
        s = self._split(text, final=True)
        return Split(s.reasoning, s.content or None)

    def extract_reasoning_streaming(
        self,
        previous_text: str,
        current_text: str,
        delta_text: str,
        previous_token_ids: Sequence[int] = (),
        current_token_ids: Sequence[int] = (),
        delta_token_ids: Sequence[int] = (),
    ) -> ReasoningDelta | None:
        """The delta after a step whose output so far is ``current_text``."""
        return self._delta(self._split(current_text, final=False))

    def finish_streaming(self, text: str) -> ReasoningDelta | None:
        """After the last step: what was held back (a marker prefix that never completed)."""
        return self._delta(self._split(text, final=True))

    def is_reasoning_end(self, token_ids: Sequence[int]) -> bool:
        """Whether the reasoning has ended in ``token_ids`` (an end marker after the last start
        marker): the engine constrains a grammar only after this (vLLM's rule). By token id when
        both markers are single tokens, else by decoding."""
        if self.end_token_id is not None and self.start_token_id is not None:
            for tok in reversed(token_ids):
                if tok == self.start_token_id:
                    return False
                if tok == self.end_token_id:
                    return True
            return False
        text = str(self.tokenizer.decode(list(token_ids)))
        return text.rfind(self.end_token) > text.rfind(self.start_token)

    def _delta(self, s: Split) -> ReasoningDelta | None:
        reasoning = (s.reasoning or "")[self._sent_reasoning:]
        content = (s.content or "")[self._sent_content:]
        self._sent_reasoning += len(reasoning)
        self._sent_content += len(content)
        if not reasoning and not content:
            return None
        return ReasoningDelta(reasoning or None, content or None)

    def _after_start(self, text: str, final: bool) -> Split:
        """The split of the text after the start marker (or of an output without one, for
        formats that start in reasoning): reasoning up to the end marker, content after it."""
        end = text.find(self.end_token)
        if end < 0:
            keep = 0 if final else holdback(text, [self.end_token])
            return Split(text[:len(text) - keep], None)
        return Split(text[:end], text[end + len(self.end_token):])


def _single_token_id(tokenizer: Any, marker: str) -> int | None:
    if tokenizer is None:
        return None
    ids = tokenizer.encode(marker, add_special_tokens=False)
    return int(ids[0]) if len(ids) == 1 else None


_PARSERS: Registry[ReasoningParser] = Registry("reasoning parser")
register_reasoning_parser = _PARSERS.register  # class decorator
get_reasoning_parser = _PARSERS.get
reasoning_parser_names = _PARSERS.names
