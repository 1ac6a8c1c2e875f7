"""Incremental detokenization and stop strings, per sequence, on the host.

Text is decoded with the prefix/read-offset method: decode a short window of trailing tokens and
emit only what the newest token added, holding back while the window ends in an incomplete UTF-8
sequence (U+FFFD). Stop strings are matched on the accumulated text; any tail that could still
grow into a stop string is held back, so a partial stop string is never emitted, and on a match
the text is cut exactly at the stop (or just after it with ``include_stop_str_in_output``).

``spaces_between_special_tokens=False`` (with ``skip_special_tokens=False``) is applied here,
because a fast tokenizer's ``decode`` ignores that flag: as in vLLM's fast detokenizer, an added
token that directly follows another added token is emitted as its own text, without the
separator the tokenizer's decoder puts before it. WordPiece decoders write "[SEP] [CLS]";
byte-level BPE (SmolLM2, Llama 3) and Gemma's sentencepiece decoder put nothing between added
tokens, so for them the flag changes nothing.
"""

from __future__ import annotations

import weakref
from typing import Any

_ADDED: weakref.WeakKeyDictionary[Any, dict[int, str]] = weakref.WeakKeyDictionary()


def added_token_texts(tokenizer: Any) -> dict[int, str]:
    """Id → text of every added (special or user-added) token, cached per tokenizer."""
    texts = _ADDED.get(tokenizer)
    if texts is None:
        texts = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
        _ADDED[tokenizer] = texts
    return texts


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], *, skip_special_tokens: bool,
                 spaces_between_special_tokens: bool, stop: list[str],
                 include_stop_str_in_output: bool) -> None:
        self.tok = tokenizer
        self.skip = skip_special_tokens
        # Added tokens whose separator from a preceding added token is dropped (empty: none).
        self.unspaced: dict[int, str] = (
            {} if skip_special_tokens or spaces_between_special_tokens
            else added_token_texts(tokenizer))
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        # Seed the window with the prompt's tail so the first output token decodes in context
        # (a leading space of "▁word" pieces depends on what precedes it).
        self.ids: list[int] = list(prompt_ids[-6:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # all output text decoded so far
        self.emitted = 0  # chars of self.text already handed out
        self.max_stop = max((len(s) for s in stop), default=0)

    def _decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=self.skip))

    def add(self, token_id: int) -> None:
        after_added = bool(self.ids) and self.ids[-1] in self.unspaced
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        # Wait while the window ends inside a UTF-8 sequence; a character spans at most 4 byte
        # tokens, so past that the bytes are invalid and are emitted as U+FFFD like decode() does.
        pending = len(self.ids) - self.read_offset
        if len(full) > len(prefix) and (not full.endswith("\ufffd") or pending >= 4):
            new = full[len(prefix):]
            if after_added and token_id in self.unspaced:
                # The previous added token was emitted whole (it is never a partial character),
                # so ``new`` is this token's text alone, with the decoder's separator in front.
                new = self.unspaced[token_id]
            self.text += new
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)

    def check_stop(self, new_from: int) -> str | None:
        """Return the stop string found in text added since char ``new_from``, cutting text."""
        if not self.stop:
            return None
        start = max(0, new_from - self.max_stop + 1)
        best: tuple[int, str] | None = None
        for s in self.stop:
            idx = self.text.find(s, start)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return None
        idx, s = best
        self.text = self.text[: idx + len(s)] if self.include_stop else self.text[:idx]
        return s

    def flush(self) -> None:
        """At the end of a sequence: decode whatever is still pending."""
        if self.read_offset < len(self.ids):
            prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
            full = self._decode(self.ids[self.prefix_offset:])
            self.text += full[len(prefix):]
            self.prefix_offset = self.read_offset = len(self.ids)

    def take(self, final: bool) -> str:
        """Text that is safe to emit now (everything, when the sequence has finished)."""
        end = len(self.text)
        if not final and self.stop:
            end -= self._held_back()
        end = max(end, self.emitted)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out

    def _held_back(self) -> int:
        """Length of the longest text suffix that is a proper prefix of some stop string."""
        for n in range(min(self.max_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
