"""Engine ``TokenLogprob`` lists → the three logprob shapes the API returns.

- legacy completions: ``{tokens, token_logprobs, top_logprobs, text_offset}``; each top dict
  holds the k best alternatives plus the sampled token (so k or k+1 entries; k=0 gives 1);
- chat: ``content[i] = {token, logprob, bytes, top_logprobs}`` with exactly k alternatives;
- prompt logprobs: per prompt position ``{str(token_id): {logprob, rank, decoded_token}}``, the
  first position null.

``-inf`` (and NaN) become -9999.0, as vLLM does, so the JSON stays valid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from serving.api.protocol import (
    ChatLogprobToken,
    ChatTopLogprob,
    CompletionLogprobs,
    PromptLogprobEntry,
)
from serving.api.tokens import TokenTexts
from serving.engine.outputs import TokenLogprob

LOGPROB_FLOOR = -9999.0


def clamp(logprob: float) -> float:
    if math.isnan(logprob) or logprob < LOGPROB_FLOOR:
        return LOGPROB_FLOOR
    return float(logprob)


class LogprobFormatter:
    """Formats logprobs for one request (``as_ids``: tokens shown as ``token_id:N``)."""

    def __init__(self, texts: TokenTexts, *, as_ids: bool = False) -> None:
        self.texts = texts
        self.as_ids = as_ids

    def token(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.as_ids else self.texts.token_text(token_id)

    def completion(self, entries: Sequence[TokenLogprob | None], token_ids: Sequence[int],
                   k: int, offset: int) -> tuple[CompletionLogprobs, int]:
        """Legacy logprobs for ``token_ids`` (an entry may be None: the first prompt token).

        Returns the logprobs and the text offset after the last token (for the next chunk).
        """
        out = CompletionLogprobs()
        for entry, tid in zip(entries, token_ids, strict=True):
            text = self.token(tid)
            out.tokens.append(text)
            out.text_offset.append(offset)
            offset += len(text)
            if entry is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(clamp(entry.logprob))
            top: dict[str, float] = {}
            for alt_id, alt_lp in entry.top[:k]:
                top.setdefault(self.token(alt_id), clamp(alt_lp))
            top.setdefault(text, clamp(entry.logprob))
            out.top_logprobs.append(top)
        return out, offset

    def chat(self, entries: Sequence[TokenLogprob], k: int) -> list[ChatLogprobToken]:
        items = []
        for entry in entries:
            items.append(ChatLogprobToken(
                token=self.token(entry.token_id), logprob=clamp(entry.logprob),
                bytes=self.texts.token_bytes(entry.token_id),
                top_logprobs=[ChatTopLogprob(token=self.token(t), logprob=clamp(lp),
                                             bytes=self.texts.token_bytes(t))
                              for t, lp in entry.top[:k]]))
        return items

    def prompt(self, entries: Sequence[TokenLogprob | None] | None,
               k: int) -> list[dict[str, PromptLogprobEntry] | None] | None:
        if entries is None:
            return None
        out: list[dict[str, PromptLogprobEntry] | None] = []
        for entry in entries:
            if entry is None:
                out.append(None)
                continue
            pos: dict[str, PromptLogprobEntry] = {}
            for rank, (alt_id, alt_lp) in enumerate(entry.top[:k], start=1):
                pos[str(alt_id)] = PromptLogprobEntry(logprob=clamp(alt_lp), rank=rank,
                                                      decoded_token=self.token(alt_id))
            pos.setdefault(str(entry.token_id), PromptLogprobEntry(
                logprob=clamp(entry.logprob), rank=entry.rank,
                decoded_token=self.token(entry.token_id)))
            out.append(pos)
        return out
