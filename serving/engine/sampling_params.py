"""SamplingParams: the per-request generation contract between the HTTP layer and the engine.

Built by ``serving.api`` from an OpenAI request (after validation) or by users of the offline
``LLM`` API; consumed by the scheduler (stop conditions, ``n``, ``max_tokens``), the model runner
(per-row device arrays) and the detokenizer (stop strings, special-token handling).
Field meanings follow vLLM's ``SamplingParams``. A frozen value: built once, never mutated.
``validate()`` raises ``ValueError`` whose message names the field; it runs once per request, in
``serving.engine.input_processor`` (the server turns the error into a 400).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

# Largest top-k logprobs a request may ask for; the compiled step always returns this many.
MAX_LOGPROBS = 20
# Largest number of logit_bias entries (the OpenAI API's own limit).
MAX_LOGIT_BIAS = 300
# The sampler's per-row bias slots: the logit_bias entries, then the ids min_tokens bans (the stop
# token ids and EOS ids) while it holds. A request that needs more is refused, never truncated.
BIAS_SLOTS = MAX_LOGIT_BIAS + 32
INT32_MAX = 2**31 - 1
# Largest stop_token_ids list: each generated token is looked up in it.
MAX_STOP_TOKEN_IDS = 256


StructuredKind = Literal["json", "regex", "choice", "grammar", "json_object", "structural_tag"]
STRUCTURED_KINDS: tuple[str, ...] = get_args(StructuredKind)


@dataclass(frozen=True)
class StructuredSpec:
    """One output constraint, whichever request form it came from (vLLM's ``structured_outputs``).

    ``spec`` by kind: ``json``: the JSON schema as JSON text (key order kept: it is the order
    properties are generated in); ``regex``: the pattern (Rust ``regex`` syntax, so ``\\d`` is
    Unicode); ``choice``: the strings, in order; ``grammar``: Lark or GBNF text; ``json_object``:
    ""; ``structural_tag``: JSON text ``{"structures": [{"begin", "schema", "end"}, ...],
    "triggers": [...]}``. The options apply to ``json`` and ``json_object`` only. Frozen and
    hashable: the grammar cache is keyed by the whole value. ``__post_init__`` checks only the
    types (``ValueError``); whether the grammar compiles is the grammar backend's question.
    """

    kind: StructuredKind
    spec: str | tuple[str, ...] = ""
    whitespace_pattern: str | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise ValueError(f"structured kind must be one of {', '.join(STRUCTURED_KINDS)}, "
                             f"got {self.kind!r}.")
        if self.kind == "choice":
            if isinstance(self.spec, str) or not all(isinstance(c, str) for c in self.spec):
                raise ValueError("a choice spec must be a tuple of strings.")
            if not self.spec:
                raise ValueError("Choice '[]' cannot be an empty list")
            object.__setattr__(self, "spec", tuple(self.spec))
        elif not isinstance(self.spec, str):
            raise ValueError(f"a {self.kind} spec must be a string.")


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: Sequence[str] = ()  # a str or a sequence of them; stored as a tuple
    stop_token_ids: Sequence[int] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k alternatives for each generated token (0: chosen only)
    prompt_logprobs: int | None = None
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens; -1: max_model_len
    detokenize: bool = True
    structured: StructuredSpec | None = None  # guided decoding; None: unconstrained

    def __post_init__(self) -> None:
        # Frozen: normalised once here, so every stage reads the same immutable value.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "logit_bias", dict(self.logit_bias))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def uses_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ``ValueError("<field>: <reason>")`` for any out-of-range value."""
        def bad(name: str, why: str) -> None:
            raise ValueError(f"{name} {why}")

        if self.n < 1:
            bad("n", f"must be at least 1, got {self.n}.")
        if self.n > 1 and self.greedy:
            bad("n", f"must be 1 when using greedy sampling, got {self.n}.")
        if not self.temperature >= 0.0:
            bad("temperature", f"must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            bad("top_k", f"must be -1 (disable), or at least 1, got {self.top_k}.")
        if self.top_k > INT32_MAX:  # the sampler's i32 row (any k >= vocab size keeps all)
            bad("top_k", f"must be at most {INT32_MAX}, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", f"must be in [0, 1], got {self.min_p}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}.")
        if not self.repetition_penalty > 0.0:
            bad("repetition_penalty", f"must be greater than zero, got {self.repetition_penalty}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad("max_tokens", f"must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            bad("min_tokens", f"must be greater than or equal to 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be less than or equal to max_tokens={self.max_tokens}, "
                f"got {self.min_tokens}.")
        for name, val in (("logprobs", self.logprobs), ("prompt_logprobs", self.prompt_logprobs)):
            if val is not None and not 0 <= val <= MAX_LOGPROBS:
                bad(name, f"must be in [0, {MAX_LOGPROBS}], got {val}.")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            bad("logit_bias", f"may hold at most {MAX_LOGIT_BIAS} entries, got "
                f"{len(self.logit_bias)}.")
        for tok, bias in self.logit_bias.items():
            if vocab_size is not None and not 0 <= int(tok) < vocab_size:
                bad("logit_bias", f"token id {tok} is out of vocabulary (size {vocab_size}).")
            if not -100.0 <= bias <= 100.0:
                bad("logit_bias", f"values must be in [-100, 100], got {bias}.")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            bad("stop_token_ids", f"may hold at most {MAX_STOP_TOKEN_IDS} ids, got "
                f"{len(self.stop_token_ids)}.")
        for tok in self.stop_token_ids:
            if vocab_size is not None and not 0 <= tok < vocab_size:
                bad("stop_token_ids", f"token id {tok} is out of vocabulary (size {vocab_size}).")
        if any(not s for s in self.stop):
            bad("stop", "strings must not be empty.")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            bad("seed", "must fit in 64 bits.")
        t = self.truncate_prompt_tokens
        if t is not None and t != -1 and t < 1:
            bad("truncate_prompt_tokens", f"must be -1 or at least 1, got {t}.")
