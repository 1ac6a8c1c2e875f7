"""``qwen3``: reasoning only when the output opens with ``<think>`` (Qwen3 writes it when
thinking is on; with ``enable_thinking=false`` the template closes an empty think block in the
prompt and the output is all content). After ``<think>``: reasoning to the first ``</think>``,
content after it; no ``</think>``: all reasoning (a truncated thought)."""

from __future__ import annotations

from serving.api.reasoning.base import ReasoningParser, Split, register_reasoning_parser


@register_reasoning_parser("qwen3")
class Qwen3ReasoningParser(ReasoningParser):
    def _split(self, text: str, final: bool) -> Split:
        if text.startswith(self.start_token):
            return self._after_start(text[len(self.start_token):], final)
        if not final and self.start_token.startswith(text):
            return Split(None, "")  # may still become the opening marker
        return Split(None, text)
