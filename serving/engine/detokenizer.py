"""Incremental detokenization and stop strings, per sequence, off the engine thread.

Text comes from ``tokenizers``' ``DecodeStream``, which buffers the tokens of an incomplete
UTF-8 character until it can emit it whole. The stream is primed with the tail of the prompt so
that the first output token decodes in context (a leading space of "▁word" pieces depends on
what precedes it); the tail is one that decodes to whole characters, so that no byte of the
prompt is ever emitted as output text. Stop strings are matched on the accumulated text; any
tail that could still grow into a stop string is held back, so a partial stop string is never
emitted, and on a match the text is cut exactly at the stop (or just after it with
``include_stop_str_in_output``).

``spaces_between_special_tokens=False`` (with ``skip_special_tokens=False``) is applied here,
because a fast tokenizer's decoder ignores that flag: as in vLLM's fast detokenizer, an added
token that directly follows another added token is emitted as its own text, without the
separator the tokenizer's decoder puts before it. WordPiece decoders write "[SEP] [CLS]";
byte-level BPE (SmolLM2, Llama 3) and Gemma's sentencepiece decoder put nothing between added
tokens, so for them the flag changes nothing. The prompt's last token counts as the previous one.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

from tokenizers.decoders import DecodeStream

# Prompt tokens fed to the stream before the first output token (enough for any merge context),
# and the longest tail tried when the shorter ones start or end inside a character.
PRIME_TOKENS = 6
MAX_PRIME_TOKENS = 24

_ADDED: weakref.WeakKeyDictionary[Any, dict[int, str]] = weakref.WeakKeyDictionary()


def added_token_texts(tokenizer: Any) -> dict[int, str]:
    """Id → text of every added (special or user-added) token, cached per tokenizer."""
    texts = _ADDED.get(tokenizer)
    if texts is None:
        texts = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
        _ADDED[tokenizer] = texts
    return texts


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], *, skip_special_tokens: bool,
                 spaces_between_special_tokens: bool, stop: Sequence[str],
                 include_stop_str_in_output: bool) -> None:
        self.tok = tokenizer  # transformers PreTrainedTokenizerFast
        self.backend = tokenizer.backend_tokenizer
        self.skip = skip_special_tokens
        # Added tokens whose separator from a preceding added token is dropped (empty: none).
        self.unspaced: dict[int, str] = (
            {} if skip_special_tokens or spaces_between_special_tokens
            else added_token_texts(tokenizer))
        self.last_id: int | None = prompt_ids[-1] if prompt_ids else None
        self.stop = tuple(stop)
        self.include_stop = include_stop_str_in_output
        self.stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        prime = self._clean_tail(prompt_ids)
        if prime:
            self.stream.step(self.backend, prime)
        self.pending: list[int] = []  # tokens the stream holds back (an incomplete character)
        self.text = ""  # all output text decoded so far
        self.emitted = 0  # chars of self.text already handed out
        self.max_stop = max((len(s) for s in self.stop), default=0)

    def _clean_tail(self, prompt_ids: Sequence[int]) -> list[int]:
        """The shortest prompt tail of at least PRIME_TOKENS tokens (or a shorter one) that
        decodes without U+FFFD; [] when none does (random bytes)."""
        n = len(prompt_ids)
        for k in [*range(PRIME_TOKENS, min(n, MAX_PRIME_TOKENS) + 1),
                  *range(min(n, PRIME_TOKENS - 1), 0, -1)]:
            tail = list(prompt_ids[-k:])
            if "\ufffd" not in self.tok.decode(tail, skip_special_tokens=self.skip):
                return tail
        return []

    def add(self, token_id: int) -> None:
        after_added = self.last_id in self.unspaced
        self.last_id = token_id
        chunk = self.stream.step(self.backend, token_id)
        if chunk is not None and after_added and token_id in self.unspaced:
            # The previous added token was emitted whole (never a partial character), so the
            # chunk is this token's text alone, with the decoder's separator in front.
            chunk = self.unspaced[token_id]
        if chunk is None:
            self.pending.append(token_id)
        else:
            self.text += chunk
            self.pending.clear()

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
        """At the end of a sequence: whatever the stream still holds, as ``decode`` shows it
        (an incomplete character becomes U+FFFD)."""
        if self.pending:
            self.text += str(self.tok.decode(self.pending, skip_special_tokens=self.skip))
            self.pending.clear()

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
