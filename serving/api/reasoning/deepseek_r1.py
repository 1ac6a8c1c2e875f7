"""``deepseek_r1``: the output starts in reasoning, whether or not the model wrote the opening
``<think>`` (R1's later templates put it in the prompt); reasoning runs to the first
``</think>``, content is what follows. No ``</think>``: all reasoning, no content (a truncated
thought). An opening ``<think>`` counts only at the very start of the output."""

from __future__ import annotations

from serving.api.reasoning.base import ReasoningParser, Split, register_reasoning_parser


@register_reasoning_parser("deepseek_r1")
class DeepSeekR1ReasoningParser(ReasoningParser):
    def _split(self, text: str, final: bool) -> Split:
        if text.startswith(self.start_token):
            return self._after_start(text[len(self.start_token):], final)
        if not final and self.start_token.startswith(text):
            return Split("", None)  # may still become the opening marker
        return self._after_start(text, final)
