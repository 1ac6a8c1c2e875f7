"""Request validation, once: (prompt, params) -> a frozen ``EngineRequest`` the engine trusts.

Runs on the caller's thread (the event loop for the HTTP server, the caller's for the offline
API), before anything is queued, so an invalid request costs the engine nothing. Every failure is
a ``RequestError`` (a ``ValueError``) whose message says what is wrong and whose ``param`` names
the field (the server answers 400 with both); neither the HTTP layer nor the engine thread
validates the same things again. Also turns texts into pooling inputs (truncation and segment ids),
because that needs the same model facts.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from models.pooling import PoolingType
from serving.engine.pooling_params import (
    PoolingInput,
    PoolingKind,
    PoolingModelInfo,
    PoolingParams,
)
from serving.engine.request import EngineRequest
from serving.engine.sampling_params import BIAS_SLOTS, SamplingParams
from serving.engine.structured_output import CompiledGrammar, GrammarBackend, GrammarError

# Wording of the too-long error per pooling task (vLLM's "... tokens in the input for <what>").
_TASK_WHAT = {"embed": "embedding generation", "encode": "embedding generation",
              "classify": "classification", "score": "score"}


class RequestError(ValueError):
    """An invalid request; ``param`` is the field at fault (``SamplingParams`` / request names:
    "prompt", "max_tokens", "truncate_prompt_tokens", ...), None when no one field is."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ModelFacts:
    """What validation needs to know about the served model and the engine's cache."""

    vocab_size: int
    max_model_len: int
    page_size: int
    usable_pages: int  # KV pages one sequence may hold at most; 0: no KV cache
    eos_ids: frozenset[int]
    tasks: tuple[str, ...]  # ("generate",) or the pooling tasks the model serves
    pooling: PoolingModelInfo | None = None
    pooling_type: PoolingType | None = None  # the model's pooler (MEAN / CLS / LAST)
    type_vocab_size: int = 0  # BERT segment ids accepted (0 or 1: none)
    has_kv_cache: bool = True
    max_tokens_cap: int | None = None  # the model's generation_config max_new_tokens


class InputProcessor:
    def __init__(self, facts: ModelFacts, tokenizer: Any, seed: int = 0,
                 grammars: GrammarBackend | None = None) -> None:
        self.facts = facts
        self.tokenizer = tokenizer
        self.grammars = grammars  # None: structured outputs are refused
        self._rng = random.Random(seed)

    # ---- generation --------------------------------------------------------------------------
    def sampling_request(self, request_id: str, prompt_ids: Sequence[int],
                         params: SamplingParams, *, cache_salt: str | None = None,
                         arrival: float | None = None,
                         grammar: CompiledGrammar | None = None) -> EngineRequest:
        """Validate a generation request; truncate its prompt (``truncate_prompt_tokens``) and
        resolve ``max_tokens`` (None: up to the context length, capped by the model's
        ``max_new_tokens``). ``params.structured`` needs its compiled ``grammar``: the HTTP
        layer compiles it off the event loop; without one it is compiled here (the offline API),
        a ``RequestError`` if it does not compile."""
        f = self.facts
        if "generate" not in f.tasks:
            raise RequestError("This model does not generate text (it serves "
                               f"{', '.join(f.tasks)}).")
        try:
            params.validate(f.vocab_size)
        except ValueError as e:  # its messages start with the field name ("top_p must be ...")
            field = str(e).split(" ", 1)[0]
            raise RequestError(str(e), field if field.isidentifier() else None) from None
        ids = list(prompt_ids)
        t = params.truncate_prompt_tokens
        if t is not None:
            k = f.max_model_len if t == -1 else t
            if k > f.max_model_len:
                raise RequestError(
                    f"truncate_prompt_tokens ({k}) cannot be greater than max_model_len "
                    f"({f.max_model_len}). Please select a smaller truncation size.",
                    "truncate_prompt_tokens")
            ids = ids[-k:]
        self._check_ids(ids, "The prompt is empty: it must hold at least one token.")
        n, m = len(ids), f.max_model_len
        if n >= m:
            raise RequestError(
                f"This model's maximum context length is {m} tokens. However, your request "
                f"has {n} input tokens. Please reduce the length of the input.", "prompt")
        if params.max_tokens is None:
            max_tokens = m - n if f.max_tokens_cap is None else min(m - n, f.max_tokens_cap)
        else:
            max_tokens = params.max_tokens
            if n + max_tokens > m:
                raise RequestError(
                    f"This model's maximum context length is {m} tokens. However, you "
                    f"requested {n + max_tokens} tokens ({n} in the input, {max_tokens} for "
                    f"the completion). Please reduce the length of the input or max_tokens.",
                    "max_tokens")
        if params.min_tokens > max_tokens:
            raise RequestError(f"min_tokens must be less than or equal to max_tokens="
                               f"{max_tokens}, got {params.min_tokens}.", "min_tokens")
        if params.min_tokens > 0:
            # The scheduler bans these ids while min_tokens holds, in the sampler's bias slots.
            bans = set(params.stop_token_ids) | (set() if params.ignore_eos else f.eos_ids)
            if len(params.logit_bias) + len(bans) > BIAS_SLOTS:
                raise RequestError(
                    f"min_tokens bans the stop_token_ids and EOS ids until it is reached, and "
                    f"the sampler holds at most {BIAS_SLOTS} logit_bias entries and banned ids "
                    f"together; this request has {len(params.logit_bias)} + {len(bans)}. Send "
                    "fewer stop_token_ids or logit_bias entries.", "stop_token_ids")
        self._check_pages(n + max_tokens, "reduce max_tokens or the prompt", "max_tokens")
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise RequestError("Parameter 'cache_salt' must be a non-empty string if provided.",
                               "cache_salt")
        grammar = self._grammar(params, grammar)
        seed = params.seed if params.seed is not None else self._rng.getrandbits(32)
        return EngineRequest(
            request_id, tuple(ids), time.time() if arrival is None else arrival,
            sampling=params, seed=int(seed) & 0xFFFFFFFF, max_tokens=max_tokens,
            eos_ids=f.eos_ids, cache_salt=cache_salt or "",
            full_prompt=params.prompt_logprobs is not None, grammar=grammar)

    def _grammar(self, params: SamplingParams, grammar: CompiledGrammar | None
                 ) -> CompiledGrammar | None:
        spec = params.structured
        if spec is None:
            if grammar is not None:
                raise ValueError("a compiled grammar was given for unconstrained params")
            return None
        if grammar is not None:
            if grammar.spec != spec:
                raise ValueError("the compiled grammar is not the params' structured spec")
            return grammar
        if self.grammars is None:
            raise RequestError("Structured outputs are not available for this model (it has "
                               "no tokenizer to build grammars over).", "structured_outputs")
        try:
            return self.grammars.compile(spec)
        except GrammarError as e:
            raise RequestError(str(e), "structured_outputs") from None

    # ---- pooling -----------------------------------------------------------------------------
    def pooling_request(self, request_id: str, inp: PoolingInput,
                        params: PoolingParams) -> EngineRequest:
        """One pooling input as an engine request (``params`` already validated by
        ``check_pooling``); truncates as the params ask, keeping the end."""
        f = self.facts
        ids, types = list(inp.token_ids), inp.token_type_ids
        if not ids:
            raise ValueError("each input must have at least one token")
        if types is not None:
            types = list(types)
            if len(types) != len(ids):
                raise ValueError("token_type_ids must be as long as the token ids")
            if min(types) < 0 or max(types) >= max(f.type_vocab_size, 1):
                raise ValueError("token_type_ids out of range for this model")
        self._check_ids(ids, "each input must have at least one token")
        keep = params.truncation_len(f.max_model_len)
        if keep is not None and len(ids) > keep:
            ids = ids[-keep:]  # vLLM's truncation of token inputs keeps the end
            types = types[-keep:] if types is not None else None
        if len(ids) > f.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {f.max_model_len} tokens. However, "
                f"you requested {len(ids)} tokens in the input for {_TASK_WHAT[params.task]}. "
                "Please reduce the length of the input.")
        self._check_pages(len(ids), "reduce the input", "input")
        kind = params.kind
        full = not f.has_kv_cache or kind != PoolingKind.POOLED or \
            f.pooling_type != PoolingType.LAST
        return EngineRequest(
            request_id, tuple(ids), time.time(), pooling=params,
            pooling_type=f.pooling_type if kind == PoolingKind.POOLED else None,
            token_type_ids=tuple(types) if types is not None and f.type_vocab_size > 1
            else None,
            full_prompt=full)

    def check_pooling(self, params: PoolingParams) -> None:
        """Refuse params the model cannot honour (before any tokenization work)."""
        if self.facts.pooling is None:
            raise ValueError("This model does not serve pooling requests.")
        params.validate(self.facts.pooling)

    def tokenize(self, texts: list[str], *, add_special_tokens: bool = True,
                 truncate_prompt_tokens: int | None = None) -> list[PoolingInput]:
        """Tokenize single texts; truncation (when asked) keeps the end, specials intact."""
        kwargs = self._truncation_kwargs(truncate_prompt_tokens)
        enc = self._tok()(texts, add_special_tokens=add_special_tokens, **kwargs)
        return self._inputs(enc, len(texts))

    def tokenize_pairs(self, texts_1: list[str], texts_2: list[str], *,
                       truncate_prompt_tokens: int | None = None) -> list[PoolingInput]:
        """Tokenize (text_1, text_2) pairs for a cross-encoder, with segment ids."""
        if len(texts_1) != len(texts_2):
            raise ValueError("text_1 and text_2 must pair up one to one")
        kwargs = self._truncation_kwargs(truncate_prompt_tokens)
        tok = self._tok()
        # One call per pair, as vLLM and a single transformers call do: an empty text_2 then
        # means "no second segment" ([CLS] a [SEP]), where a batched call would add a [SEP].
        out: list[PoolingInput] = []
        for a, b in zip(texts_1, texts_2, strict=True):
            out.extend(self._inputs({k: [v] for k, v in tok(a, b, **kwargs).items()}, 1))
        return out

    # ---- shared checks -----------------------------------------------------------------------
    def _check_ids(self, ids: list[int], empty: str) -> None:
        if not ids:
            raise RequestError(empty, "prompt")
        v = self.facts.vocab_size
        for t in ids:
            if not 0 <= t < v:
                raise RequestError(f"Token id {t} is out of vocabulary (vocabulary size {v}).",
                                   "prompt")

    def _check_pages(self, num_tokens: int, fix: str, param: str) -> None:
        f = self.facts
        if not f.has_kv_cache:
            return
        need = -(-num_tokens // f.page_size)
        if need > f.usable_pages:
            raise RequestError(f"The request needs {need} KV pages but the cache holds "
                               f"{f.usable_pages}; {fix}.", param)

    def _tok(self) -> Any:
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer; send token ids")
        return self.tokenizer

    def _truncation_kwargs(self, truncate_prompt_tokens: int | None) -> dict[str, Any]:
        if truncate_prompt_tokens is None:
            return {}
        keep = PoolingParams(truncate_prompt_tokens=truncate_prompt_tokens)
        keep.validate(PoolingModelInfo(tasks=("embed",), hidden_size=1,
                                       max_model_len=self.facts.max_model_len))
        return {"truncation": True,
                "max_length": keep.truncation_len(self.facts.max_model_len)}

    def _inputs(self, enc: Any, n: int) -> list[PoolingInput]:
        with_types = self.facts.type_vocab_size > 1 and "token_type_ids" in enc
        return [PoolingInput(list(enc["input_ids"][i]),
                             list(enc["token_type_ids"][i]) if with_types else None)
                for i in range(n)]
