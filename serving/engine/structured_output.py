"""The grammar backend for structured outputs (guided decoding), over llguidance.

One ``GrammarBackend`` per engine. It owns the llguidance tokenizer (built once, at start-up,
from the engine's HF tokenizer JSON, with every EOS id and ``n_vocab`` = the model's logits width,
which can exceed the tokenizer's vocabulary), compiles a ``StructuredSpec`` into an llguidance
grammar behind a bounded LRU cache, builds ``GrammarMatcher``s, and fills token bitmasks.

Masks are ``i32[rows, ceil(V/32)]`` with V the logits width: bit ``t % 32`` of word ``t // 32``
is set when token ``t`` is allowed. A row without a matcher is all ones (-1), the identity.
A gated matcher (reasoning not yet over) fills all ones too.

Threading: ``compile`` and ``new_matcher`` are safe from any thread (the cache holds a lock, and
llguidance drops the GIL while it builds a grammar), so the API layer runs them in its worker pool
and the engine thread never pays for a grammar build. A ``GrammarMatcher`` is owned by one
sequence and touched by one thread at a time.

Cost bound: every matcher runs under ``parser_limits()``; a mask that would exceed them puts the
matcher into its error state (``is_error``) instead of running on, and its owner ends the request.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.numpy as llnp
import numpy as np

from serving.engine.sampling_params import StructuredSpec

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# vLLM and sglang keep 128 compiled grammars.
GRAMMAR_CACHE_SIZE = 128

# Caps on the work of one mask. By llguidance's own speed figures (lexer fuel ~14k/ms, Earley
# items ~20k/ms) one mask costs at most about 15 ms + 3 ms whatever the grammar; lexer states
# cost 1-2 kB each, so a matcher's lexer is bounded at 250-500 MB (a pathological grammar hits
# the limit and errors long before a normal one comes near it). These are llguidance's defaults
# written out, so the bound is ours and cannot drift with a library upgrade.
# verbose_errors=False: an error message must not echo parser state or the grammar.
def parser_limits() -> llguidance.LLParserLimits:
    """The limits every grammar and matcher of a ``GrammarBackend`` runs under by default."""
    return llguidance.LLParserLimits(
        max_items_in_row=2_000,
        initial_lexer_fuel=1_000_000,
        step_lexer_fuel=200_000,
        step_max_items=50_000,
        max_lexer_states=250_000,
        max_grammar_size=500_000,
        verbose_errors=False,
    )

# Below this many rows a serial fill is cheaper than handing the batch to the thread pool.
PARALLEL_FILL_MIN_ROWS = 8


class GrammarError(ValueError):
    """A grammar that does not compile or validate; the message starts with "Grammar error: "
    (vLLM's wording), and the HTTP layer answers it with a 400."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"Grammar error: {detail}")


@dataclass(frozen=True)
class CompiledGrammar:
    """An llguidance grammar that validated against this backend's tokenizer and limits."""

    spec: StructuredSpec
    grammar: str  # llguidance's serialized grammar, what an LLMatcher is built from


class GrammarMatcher:
    """One sequence's grammar state: which tokens may come next, advanced by each sampled token.

    A matcher may start *gated* (``after``, vLLM's rule for reasoning models): until the output
    contains that text (the end of the reasoning, e.g. ``</think>``) it constrains nothing and
    consumes nothing; the grammar applies from the token after the one that completed it. The
    marker is matched on the decoded bytes of the last tokens, so it is found however the
    tokenizer splits it (``</think>`` is three tokens in SmolLM2, ``" </"`` another of them).

    Never raises for grammar-level problems: a refused token, or a mask over the parser limits,
    puts the matcher into an error state for good (``is_error``, ``error``).
    """

    __slots__ = ("_after", "_m", "_tail", "_tokenizer")

    def __init__(self, matcher: llguidance.LLMatcher, tokenizer: llguidance.LLTokenizer,
                 after: bytes | None = None, tail: tuple[int, ...] = ()) -> None:
        self._m = matcher
        self._tokenizer = tokenizer
        self._after = after or None  # b"": no gate
        self._tail = tail  # the last output tokens while gated (at most len(after) + 1)

    @property
    def ll(self) -> llguidance.LLMatcher:
        """The llguidance matcher (for the parallel fill)."""
        return self._m

    @property
    def active(self) -> bool:
        """Whether the grammar constrains the next token (False while gated)."""
        return self._after is None

    def copy(self) -> GrammarMatcher:
        """An independent matcher in the same state (each sequence of an ``n > 1`` request)."""
        return GrammarMatcher(self._m.deep_copy(), self._tokenizer, self._after, self._tail)

    def consume(self, token_id: int) -> bool:
        """Advance by one sampled token; False (and the error state) if the grammar refuses it.
        While gated: remember the token, and open the gate once the output holds the marker."""
        if self._after is not None:
            # A marker of L bytes spans at most L tokens, plus one it may start inside.
            self._tail = (*self._tail, token_id)[-(len(self._after) + 1):]
            if self._after in self._tokenizer.decode_bytes(list(self._tail)):
                self._after, self._tail = None, ()
            return True
        return bool(self._m.consume_token(token_id))

    def is_stopped(self) -> bool:
        """The grammar is complete and allows nothing but EOS (the mask is EOS only)."""
        return self.active and bool(self._m.is_stopped())

    def is_accepting(self) -> bool:
        """The text so far is a complete instance (EOS is allowed), though it may go on."""
        return self.active and bool(self._m.is_accepting())

    def is_error(self) -> bool:
        return bool(self._m.is_error())

    def error(self) -> str:
        """Why the matcher is in its error state ("" when it is not)."""
        return str(self._m.get_error()) if self._m.is_error() else ""


class GrammarBackend:
    """Compiles specs and fills masks for one engine (one tokenizer, one logits width)."""

    def __init__(
        self,
        tokenizer_json: str,
        eos_ids: Iterable[int],
        vocab_size: int,
        *,
        cache_size: int = GRAMMAR_CACHE_SIZE,
        fill_threads: int | None = None,
        limits: llguidance.LLParserLimits | None = None,
    ) -> None:
        """``tokenizer_json``: the HF ``tokenizer.json`` text (``backend_tokenizer.to_str()``);
        ``eos_ids``: every id that ends generation (a stopped grammar allows exactly these);
        ``vocab_size``: the logits width V, which the masks cover; ``fill_threads``: the
        parallel fill's threads (None: llguidance's default, most of the cores); ``limits``:
        the parser limits of every grammar and matcher (None: ``parser_limits()``)."""
        eos = sorted(set(eos_ids))
        if not eos:
            raise ValueError("a grammar backend needs at least one EOS id")
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size,
                                                eos_token=eos)
        self.vocab_size = vocab_size
        self.mask_width = (vocab_size + 31) // 32
        self._limits = limits if limits is not None else parser_limits()
        self._cache_size = cache_size
        # spec -> the serialized grammar, or the GrammarError message (a bad grammar sent again
        # is refused from the cache instead of being compiled again).
        self._cache: OrderedDict[StructuredSpec, tuple[str, bool]] = OrderedDict()
        self._lock = threading.Lock()
        self._fill_threads = fill_threads
        self._executor: llguidance.LLExecutor | None = None

    @classmethod
    def from_hf_tokenizer(cls, tokenizer: Any, eos_ids: Iterable[int], vocab_size: int,
                          **kwargs: Any) -> GrammarBackend:
        """From a ``PreTrainedTokenizerFast`` (its backend tokenizer's JSON)."""
        return cls(tokenizer.backend_tokenizer.to_str(), eos_ids, vocab_size, **kwargs)

    # ---- grammars ----------------------------------------------------------------------------

    @property
    def cache_size(self) -> int:
        """How many compiled grammars the cache holds now (for the metric)."""
        return len(self._cache)

    def is_cached(self, spec: StructuredSpec) -> bool:
        """Whether ``spec``'s grammar (or its error) is in the cache; does not touch its age."""
        with self._lock:
            return spec in self._cache

    def compile(self, spec: StructuredSpec) -> CompiledGrammar:
        """The grammar of ``spec``, validated against this tokenizer and the parser limits.

        Raises ``GrammarError`` for anything that does not compile. Cached by ``spec`` (LRU,
        ``cache_size`` entries); safe from any thread, and it may take up to about a second for a
        huge grammar, so the caller runs it off the event loop and off the engine thread.
        """
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
        if hit is None:
            hit = self._build(spec)
            with self._lock:
                self._cache[spec] = hit
                self._cache.move_to_end(spec)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        text, ok = hit
        if not ok:
            raise GrammarError(text)
        return CompiledGrammar(spec, text)

    def _build(self, spec: StructuredSpec) -> tuple[str, bool]:
        try:
            grammar = serialize_grammar(spec)
        except GrammarError as e:
            return str(e).removeprefix("Grammar error: "), False
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, self.tokenizer, limits=self._limits)
        if is_error:
            return messages[0].strip(), False
        return grammar, True

    def new_matcher(self, compiled: CompiledGrammar, after: str | None = None
                    ) -> GrammarMatcher:
        """A fresh matcher at the start of ``compiled`` (about 1 ms; up to a second for a huge
        grammar, with the GIL dropped), gated until the output holds ``after`` when given.
        Raises ``GrammarError`` if it cannot be built."""
        m = llguidance.LLMatcher(self.tokenizer, compiled.grammar, log_level=0,
                                 limits=self._limits)
        if m.is_error():
            raise GrammarError(str(m.get_error()).strip())
        return GrammarMatcher(m, self.tokenizer, after.encode() if after else None)

    # ---- masks -------------------------------------------------------------------------------

    def allocate_masks(self, rows: int) -> np.ndarray:
        """A mask buffer ``i32[rows, ceil(V/32)]``, all ones (every token allowed)."""
        return np.full((rows, self.mask_width), -1, dtype=np.int32)

    def fill_masks(self, out: np.ndarray, matchers: Sequence[GrammarMatcher | None]) -> None:
        """Write row i of ``out`` for ``matchers[i]``: its next-token mask, or all ones for None.

        ``out`` is a C-contiguous ``i32[R, ceil(V/32)]`` with ``R >= len(matchers)``; rows past
        ``len(matchers)`` are left as they are. A stopped matcher's row allows EOS only. An
        errored matcher's row is all ones: the row must still have an allowed token, and the
        matcher's owner ends the request. Serial for few rows, llguidance's thread pool (GIL
        dropped) for many.
        """
        if out.dtype != np.int32 or out.ndim != 2 or out.shape[1] != self.mask_width:
            raise ValueError(f"mask buffer must be int32[rows, {self.mask_width}], "
                             f"got {out.dtype}{list(out.shape)}")
        if not out.flags["C_CONTIGUOUS"] or out.shape[0] < len(matchers):
            raise ValueError("mask buffer must be C-contiguous with a row per matcher")
        live: list[tuple[llguidance.LLMatcher, int]] = []
        for row, m in enumerate(matchers):
            if m is None or m.is_error() or not m.active:
                out[row] = -1
            else:
                live.append((m.ll, row))
        if len(live) < PARALLEL_FILL_MIN_ROWS:
            for m_ll, row in live:
                llnp.fill_next_token_bitmask(m_ll, out, row)
        else:
            llnp.fill_next_token_bitmask_par(self._pool(), live, out)

    def _pool(self) -> llguidance.LLExecutor:
        # Built on first use: an engine that never sees many constrained rows keeps no threads.
        if self._executor is None:
            self._executor = llguidance.LLExecutor(self._fill_threads)
        return self._executor


def serialize_grammar(spec: StructuredSpec) -> str:
    """``spec`` as an llguidance grammar string (not yet validated against a tokenizer).

    Raises ``GrammarError`` when the spec cannot even be read (bad JSON, a GBNF grammar that
    does not convert, a structural tag without structures or with a begin its triggers miss).
    """
    kind = spec.kind
    if kind in ("json", "json_object"):
        schema: Any = {"type": "object"} if kind == "json_object" else _loads(spec.spec)
        if not isinstance(schema, dict | bool):
            raise GrammarError("a JSON schema must be an object or a boolean")
        if spec.disable_additional_properties:
            schema = _close_objects(schema)
        options: JsonCompileOptions = {"whitespace_flexible": not spec.disable_any_whitespace}
        if spec.whitespace_pattern is not None and not spec.disable_any_whitespace:
            options["whitespace_pattern"] = spec.whitespace_pattern
        try:
            return str(llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options))
        except ValueError as e:
            raise GrammarError(str(e)) from None
    if kind == "regex":
        return str(llguidance.LLMatcher.grammar_from_regex(str(spec.spec)))
    if kind == "choice":
        # Lark string literals take JSON string escapes.
        lark = "start: " + " | ".join(json.dumps(c) for c in spec.spec)
        return str(llguidance.LLMatcher.grammar_from_lark(lark))
    if kind == "grammar":
        try:
            # grammar_from("grammar", ...) reads Lark as is and converts GBNF to Lark.
            return str(llguidance.grammar_from("grammar", str(spec.spec)))
        except ValueError as e:
            raise GrammarError(str(e)) from None
    return _structural_tag_grammar(str(spec.spec))


def _loads(text: str | tuple[str, ...]) -> Any:
    try:
        return json.loads(str(text))
    except json.JSONDecodeError as e:
        raise GrammarError(f"invalid JSON: {e}") from None


def _close_objects(node: Any) -> Any:
    """A copy of a schema in which every object with ``properties`` and no
    ``additionalProperties`` gets ``additionalProperties: false`` (vLLM's
    ``disable_additional_properties``)."""
    if isinstance(node, list):
        return [_close_objects(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _close_objects(v) for k, v in node.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _structural_tag_grammar(text: str) -> str:
    """vLLM's structural tag: each structure's ``begin`` starts with one of ``triggers``; free
    text until a trigger, then ``begin``, a JSON value under ``schema``, then ``end``."""
    tag = _loads(text)
    if not isinstance(tag, dict):
        raise GrammarError("a structural tag must be an object")
    structures, triggers = tag.get("structures"), tag.get("triggers")
    if not isinstance(structures, list) or not structures:
        raise GrammarError("a structural tag needs a non-empty list of structures")
    if not isinstance(triggers, list) or not all(isinstance(t, str) and t for t in triggers):
        raise GrammarError("a structural tag needs a list of non-empty trigger strings")
    tags = []
    for s in structures:
        if not isinstance(s, dict) or not isinstance(s.get("begin"), str) \
                or not isinstance(s.get("end"), str) or not isinstance(s.get("schema"), dict):
            raise GrammarError("each structure needs begin and end strings and a schema object")
        trigger = next((t for t in triggers if s["begin"].startswith(t)), None)
        if trigger is None:
            raise GrammarError(f"the begin {s['begin']!r} starts with none of the triggers "
                               f"{triggers}")
        tags.append(llguidance.StructTag(trigger=trigger, begin=s["begin"], grammar=s["schema"],
                                         end=s["end"]))
    return str(llguidance.StructTag.to_grammar(tags))
