"""Engine records -> what callers consume, off the engine thread: text, stop strings, pooling.

The engine thread emits ``SeqOutput``s (token ids, no text). ``OutputProcessor.process`` runs on
the caller's side (the asyncio loop of ``AsyncEngineClient``, or the thread of the offline ``LLM``)
and turns them into ``RequestOutput`` deltas: it detokenizes each choice incrementally, checks
stop strings (which need text, so the engine cannot), and reports the choices a stop string
ended so that the caller can release them in the engine (tokens the engine drew after that are
dropped here). Pooling results get their per-request post-processing (Matryoshka truncation,
normalisation, activations) and become ``PoolingOutput``s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.pooling import (
    Activation,
    PoolerConfig,
    apply_activation,
    l2_normalize_np,
)
from serving.engine.detokenizer import IncrementalDetokenizer
from serving.engine.outputs import CompletionDelta, RequestOutput, SeqOutput, TokenLogprob
from serving.engine.pooling_params import PoolingOutput, PoolingParams
from serving.engine.records import PositionLogprob, SampledToken
from serving.engine.request import EngineRequest
from serving.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class PoolingPost:
    """The model's pooling defaults, applied per request to raw pooled outputs."""

    pooler: PoolerConfig
    classify_activation: Activation
    score_activation: Activation

    def apply(self, params: PoolingParams, raw: np.ndarray) -> np.ndarray:
        if params.task == "embed":
            v = raw[: params.dimensions] if params.dimensions else raw
            norm = self.pooler.normalize if params.normalize is None else params.normalize
            return l2_normalize_np(v) if norm else v.astype(np.float32)
        if params.task == "encode":
            return l2_normalize_np(raw) if params.normalize else raw.astype(np.float32)
        if params.activation is False:
            return raw.astype(np.float32)
        act = self.score_activation if params.task == "score" else self.classify_activation
        return apply_activation(raw, act)


def _logprob(t: SampledToken | PositionLogprob) -> TokenLogprob:
    return TokenLogprob(t.token_id, t.logprob, t.rank,
                        list(zip(t.top_ids, t.top_logprobs, strict=True)))


@dataclass(eq=False)
class _Choice:
    index: int
    params: SamplingParams
    detok: IncrementalDetokenizer
    num_generated: int = 0
    finished: bool = False

    def apply(self, out: SeqOutput) -> tuple[CompletionDelta, bool]:
        """This step's delta, and whether a stop string ended the choice (the engine does not
        know yet)."""
        p = self.params
        finish = out.finish_reason
        stop_reason: int | str | None = out.stop_reason
        by_string = False
        for tok in out.new_token_ids:
            self.num_generated += 1
            text_from = len(self.detok.text)
            if finish == "stop" and stop_reason is not None:  # a stop token id
                if p.include_stop_str_in_output:
                    self.detok.add(tok)
            elif finish == "stop":  # EOS is never text
                pass
            else:
                self.detok.add(tok)
                if self.num_generated >= p.min_tokens and \
                        (s := self.detok.check_stop(text_from)) is not None:
                    by_string = finish is None
                    finish, stop_reason = "stop", s
        if finish == "length":
            self.detok.flush()
        text = self.detok.take(final=finish is not None)
        lp = [_logprob(t) for t in out.logprobs] if p.logprobs is not None else None
        self.finished = finish is not None
        delta = CompletionDelta(self.index, list(out.new_token_ids), text, lp, finish,
                                stop_reason, self.num_generated)
        return delta, by_string


@dataclass(eq=False)
class _Request:
    spec: EngineRequest
    choices: list[_Choice]
    prompt_logprobs: list[TokenLogprob | None] | None = None
    sent_first: bool = False


@dataclass
class Processed:
    outputs: list[RequestOutput] = field(default_factory=list)
    pooled: list[tuple[str, PoolingOutput]] = field(default_factory=list)
    # (request_id, choice) a stop string ended: the caller finishes them in the engine.
    stopped: list[tuple[str, int]] = field(default_factory=list)
    # pooling requests the engine ended without a result (aborted)
    failed: list[str] = field(default_factory=list)


class OutputProcessor:
    def __init__(self, tokenizer: Any, pooling: PoolingPost | None = None) -> None:
        self.tokenizer = tokenizer
        self.pooling = pooling
        self._requests: dict[str, _Request] = {}

    def add(self, spec: EngineRequest) -> None:
        """Track a request before it is handed to the engine."""
        choices: list[_Choice] = []
        p = spec.sampling
        if p is not None:
            choices = [_Choice(i, p, IncrementalDetokenizer(
                self.tokenizer, spec.prompt_ids, skip_special_tokens=p.skip_special_tokens,
                spaces_between_special_tokens=p.spaces_between_special_tokens, stop=p.stop,
                include_stop_str_in_output=p.include_stop_str_in_output))
                for i in range(p.n)]
        plp: list[TokenLogprob | None] | None = None
        if p is not None and p.prompt_logprobs is not None:
            plp = [None] * spec.prompt_len
        self._requests[spec.request_id] = _Request(spec, choices, plp)

    def drop(self, request_id: str) -> None:
        """Forget a request its caller gave up on."""
        self._requests.pop(request_id, None)

    def process(self, outs: list[SeqOutput]) -> Processed:
        res = Processed()
        by_req: dict[str, RequestOutput] = {}
        for o in outs:
            st = self._requests.get(o.request_id)
            if st is None:
                continue
            if st.spec.pooling is not None:
                self._pooled(st, o, res)
                continue
            if st.prompt_logprobs is not None:
                for pl in o.prompt_logprobs:
                    st.prompt_logprobs[pl.position] = _logprob(pl)
            ch = st.choices[o.index]
            if ch.finished or (not o.new_token_ids and o.finish_reason is None):
                continue
            delta, by_string = ch.apply(o)
            if by_string:
                res.stopped.append((o.request_id, o.index))
            out = by_req.get(o.request_id)
            if out is None:
                out = by_req[o.request_id] = RequestOutput(
                    o.request_id, list(st.spec.prompt_ids), [],
                    num_cached_tokens=o.num_cached_tokens)
                if st.prompt_logprobs is not None and not st.sent_first:
                    out.prompt_logprobs = list(st.prompt_logprobs)
                st.sent_first = True
            out.outputs.append(delta)
        for rid, out in by_req.items():
            out.finished = all(c.finished for c in self._requests[rid].choices)
            if out.finished:
                del self._requests[rid]
        res.outputs = list(by_req.values())
        return res

    def _pooled(self, st: _Request, o: SeqOutput, res: Processed) -> None:
        rid = st.spec.request_id
        del self._requests[rid]
        if o.pooled is None:
            res.failed.append(rid)
            return
        assert self.pooling is not None and st.spec.pooling is not None
        data = self.pooling.apply(st.spec.pooling, o.pooled)
        res.pooled.append((rid, PoolingOutput(data, st.spec.prompt_len)))
