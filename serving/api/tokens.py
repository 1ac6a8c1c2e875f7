"""Token ids → the strings and bytes that logprob responses show.

``token_text(i)`` is ``tokenizer.decode([i])`` with special tokens kept (vLLM's
``decoded_token``); a byte-level token that holds part of a UTF-8 character decodes to U+FFFD
there, so ``token_bytes(i)`` returns the token's *raw* bytes instead (OpenAI's ``bytes`` field
exists so clients can rebuild such characters). Both are cached per id: logprob responses ask for
the same few thousand ids again and again.
"""

from __future__ import annotations

import re
import threading
from typing import Any

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes→unicode table (byte-level BPE vocabularies)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class TokenTexts:
    """Per-id token strings and bytes for one tokenizer (thread-safe, lazily filled)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}
        self._lock = threading.Lock()
        self._byte_level = _is_byte_level(tokenizer)
        self._decoder = _byte_decoder() if self._byte_level else {}

    def token_text(self, token_id: int) -> str:
        text = self._text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False) or ""
            with self._lock:
                self._text[token_id] = text
        return text

    def token_bytes(self, token_id: int) -> list[int]:
        raw = self._bytes.get(token_id)
        if raw is None:
            raw = self._raw_bytes(token_id)
            with self._lock:
                self._bytes[token_id] = raw
        return raw

    def _raw_bytes(self, token_id: int) -> list[int]:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        special = token_id in getattr(self.tokenizer, "all_special_ids", ())
        if isinstance(piece, str) and not special:
            if self._byte_level and all(c in self._decoder for c in piece):
                return [self._decoder[c] for c in piece]
            m = _BYTE_FALLBACK.match(piece)
            if m:
                return [int(m.group(1), 16)]
            if "▁" in piece:  # sentencepiece word boundary
                return list(piece.replace("▁", " ").encode("utf-8"))
        return list(self.token_text(token_id).encode("utf-8"))

    def token_strs(self, token_ids: list[int]) -> list[str]:
        """Raw vocabulary pieces (``convert_ids_to_tokens``), as /tokenize returns them."""
        pieces = self.tokenizer.convert_ids_to_tokens(token_ids)
        return [p if isinstance(p, str) else "" for p in pieces]


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return False
    text = repr(decoder)
    return "ByteLevel" in text
