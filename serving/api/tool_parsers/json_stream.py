"""Tool-call arguments as they stream: a JSON value re-serialized from a growing prefix.

``scan_json(text, pos, final)`` reads one JSON value at ``text[pos:]`` and returns it written
the way ``json.dumps(value, ensure_ascii=False)`` writes it (separators ", " and ": ", one
canonical escape per character, numbers as Python prints them), but only as far as the lexical
tokens that are complete: a string's characters come as they arrive, a number or a literal once
it has ended. So the output for a prefix of a text is always a prefix of the output for the whole
text, which is what lets streamed argument fragments concatenate to exactly the non-streamed
arguments. Duplicate keys are kept as written (``json.loads`` would keep only the last).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

_WS = " \t\n\r"
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r",
            "t": "\t"}
_NUMBER_CHARS = frozenset("+-0123456789.eE")
_LITERALS = {"t": "true", "f": "false", "n": "null"}


@dataclass(frozen=True)
class JsonScan:
    """``text``: the canonical JSON of what is complete so far; ``end``: the index just past
    the value once it is complete (None until then); ``error``: the text cannot be JSON."""

    text: str
    end: int | None
    error: bool = False


class _Incomplete(Exception):
    pass


class _Invalid(Exception):
    pass


def scan_json(text: str, pos: int = 0, final: bool = False) -> JsonScan:
    """One JSON value at ``text[pos:]`` (leading whitespace skipped). ``final``: the text will
    not grow, so a number that reaches the end of it is complete."""
    s = _Scanner(text, final)
    try:
        end = s.value(pos)
    except _Incomplete:
        return JsonScan("".join(s.out), None)
    except _Invalid:
        return JsonScan("".join(s.out), None, error=True)
    return JsonScan("".join(s.out), end)


def skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    return pos


class _Scanner:
    def __init__(self, text: str, final: bool) -> None:
        self.t = text
        self.final = final
        self.out: list[str] = []

    def _peek(self, pos: int) -> str:
        if pos >= len(self.t):
            raise _Incomplete
        return self.t[pos]

    def value(self, pos: int) -> int:
        pos = skip_ws(self.t, pos)
        c = self._peek(pos)
        if c == "{":
            return self._container(pos, "}", is_object=True)
        if c == "[":
            return self._container(pos, "]", is_object=False)
        if c == '"':
            return self.string(pos, emit=True)[0]
        if c in _LITERALS:
            return self._literal(pos, _LITERALS[c])
        if c == "-" or c.isdigit():
            return self._number(pos)
        raise _Invalid

    def _container(self, pos: int, close: str, is_object: bool) -> int:
        self.out.append(self.t[pos])
        pos = skip_ws(self.t, pos + 1)
        if self._peek(pos) == close:
            self.out.append(close)
            return pos + 1
        while True:
            if is_object:
                if self._peek(pos) != '"':
                    raise _Invalid
                pos = skip_ws(self.t, self.string(pos, emit=True)[0])
                if self._peek(pos) != ":":
                    raise _Invalid
                self.out.append(": ")
                pos += 1
            pos = skip_ws(self.t, self.value(pos))
            c = self._peek(pos)
            if c == close:
                self.out.append(close)
                return pos + 1
            if c != ",":
                raise _Invalid
            self.out.append(", ")
            pos = skip_ws(self.t, pos + 1)

    def string(self, pos: int, emit: bool) -> tuple[int, str]:
        """A string at ``pos`` (its opening quote); the index past it and its value. With
        ``emit``, its canonical form goes out character by character."""
        if emit:
            self.out.append('"')
        chars: list[str] = []
        pos += 1
        while True:
            c = self._peek(pos)
            if c == '"':
                if emit:
                    self.out.append('"')
                return pos + 1, "".join(chars)
            if c == "\\":
                ch, pos = self._escape(pos)
            elif c < " ":
                raise _Invalid  # raw control characters are not allowed in JSON strings
            else:
                ch, pos = c, pos + 1
            chars.append(ch)
            if emit:
                self.out.append(json.dumps(ch, ensure_ascii=False)[1:-1])

    def _escape(self, pos: int) -> tuple[str, int]:
        e = self._peek(pos + 1)
        if e in _ESCAPES:
            return _ESCAPES[e], pos + 2
        if e != "u":
            raise _Invalid
        code = self._hex4(pos + 2)
        if 0xD800 <= code < 0xDC00:
            # A high surrogate pairs with a low one that follows as another escape.
            nxt = self.t[pos + 6:pos + 8]
            if len(nxt) < 2 and not self.final:
                raise _Incomplete
            if nxt == "\\u":
                low = self._hex4(pos + 8)
                if 0xDC00 <= low < 0xE000:
                    return chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)), pos + 12
        return chr(code), pos + 6

    def _hex4(self, pos: int) -> int:
        digits = self.t[pos:pos + 4]
        if len(digits) < 4:
            if all(d in "0123456789abcdefABCDEF" for d in digits):
                raise _Incomplete
            raise _Invalid
        try:
            return int(digits, 16)
        except ValueError:
            raise _Invalid from None

    def _literal(self, pos: int, word: str) -> int:
        got = self.t[pos:pos + len(word)]
        if not word.startswith(got):
            raise _Invalid
        if len(got) < len(word):
            raise _Incomplete
        self.out.append(word)
        return pos + len(word)

    def _number(self, pos: int) -> int:
        end = pos
        while end < len(self.t) and self.t[end] in _NUMBER_CHARS:
            end += 1
        if end == len(self.t) and not self.final:
            raise _Incomplete  # more digits may follow
        raw = self.t[pos:end]
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            raise _Invalid from None
        self.out.append(json.dumps(value))
        return end


@dataclass(frozen=True)
class CallScan:
    """One ``{"name": ..., "arguments": {...}}`` object as far as it has been read."""

    name: str | None
    arguments: str  # canonical JSON of the arguments read so far ("{}" once absent at the end)
    end: int | None  # index past the object once it is complete
    error: bool = False


def scan_call_object(text: str, pos: int, final: bool,
                     args_keys: tuple[str, ...] = ("arguments", "parameters")) -> CallScan:
    """A call object at ``text[pos:]`` (leading whitespace skipped): its ``name`` once that
    string is complete, the canonical JSON of the value under the first of ``args_keys`` as far
    as it is complete; other members are read and dropped."""
    name: str | None = None
    args: str | None = None
    s = _Scanner(text, final)
    pos = skip_ws(text, pos)
    try:
        if s._peek(pos) != "{":
            raise _Invalid
        pos = skip_ws(text, pos + 1)
        if s._peek(pos) != "}":
            while True:
                if s._peek(pos) != '"':
                    raise _Invalid
                pos, key = s.string(pos, emit=False)
                pos = skip_ws(text, pos)
                if s._peek(pos) != ":":
                    raise _Invalid
                pos = skip_ws(text, pos + 1)
                if key == "name" and name is None:
                    if s._peek(pos) != '"':
                        raise _Invalid
                    pos, name = s.string(pos, emit=False)
                elif key in args_keys and args is None:
                    sc = scan_json(text, pos, final)
                    if sc.error:
                        raise _Invalid
                    args = sc.text
                    if sc.end is None:
                        raise _Incomplete
                    pos = sc.end
                else:
                    other = scan_json(text, pos, final)
                    if other.error:
                        raise _Invalid
                    if other.end is None:
                        raise _Incomplete
                    pos = other.end
                pos = skip_ws(text, pos)
                c = s._peek(pos)
                if c == "}":
                    break
                if c != ",":
                    raise _Invalid
                pos = skip_ws(text, pos + 1)
    except _Incomplete:
        return CallScan(name, args or "", None)
    except _Invalid:
        return CallScan(name, args or "", None, error=True)
    return CallScan(name, "{}" if args is None else args, pos + 1, error=name is None)
