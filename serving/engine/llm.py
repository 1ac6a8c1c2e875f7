"""Offline batch API, like vLLM's ``LLM(model).generate(prompts, SamplingParams(...))`` and
``LLM.encode(inputs, PoolingParams(...))``: the engine runs in the caller's thread until done."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from serving.engine.config import EngineArgs
from serving.engine.engine import LLMEngine
from serving.engine.output_processor import OutputProcessor
from serving.engine.outputs import TokenLogprob
from serving.engine.pooling_params import PoolingInput, PoolingOutput, PoolingParams
from serving.engine.sampling_params import SamplingParams


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class GenerationResult:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None


class LLM:
    """Runs the engine in the caller's thread until every prompt is done."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        loaded = kwargs.pop("loaded", None)
        self._attach(LLMEngine(EngineArgs(model=model, **kwargs), loaded=loaded))

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> LLM:
        """The offline API over an engine built elsewhere (nothing else may drive it)."""
        llm = cls.__new__(cls)
        llm._attach(engine)
        return llm

    def _attach(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.processor = engine.input_processor()
        self.outputs = OutputProcessor(engine.tokenizer, engine.pooling_post())
        self._ids = itertools.count()

    def get_default_sampling_params(self) -> SamplingParams:
        return SamplingParams(**self.engine.generation_defaults())

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[GenerationResult]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or self.get_default_sampling_params()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        results: dict[str, GenerationResult] = {}
        order = []
        for prompt, p in zip(prompts, plist, strict=True):
            rid = str(next(self._ids))
            ids: list[int] = (self.tokenizer.encode(prompt) if isinstance(prompt, str)
                              else [int(t) for t in prompt])  # type: ignore[call-overload]
            spec = self.processor.sampling_request(rid, ids, p)
            self.outputs.add(spec)
            self.engine.add_request(spec)
            res = GenerationResult(rid, prompt if isinstance(prompt, str) else None,
                                   list(spec.prompt_ids))
            res.outputs = [CompletionOutput(i, "", [], None,
                                            logprobs=[] if p.logprobs is not None else None)
                           for i in range(p.n)]
            results[rid] = res
            order.append(rid)
        bar = tqdm(total=len(order), desc="generating", unit="req", disable=not use_tqdm)
        while self.engine.has_work:
            done = self.outputs.process(self.engine.step())
            for rid, index in done.stopped:
                self.engine.finish_sequence(rid, index)
            for out in done.outputs:
                res = results[out.request_id]
                if out.prompt_logprobs is not None:
                    res.prompt_logprobs = out.prompt_logprobs
                for d in out.outputs:
                    o = res.outputs[d.index]
                    o.text += d.text
                    o.token_ids += d.token_ids
                    if d.logprobs and o.logprobs is not None:
                        o.logprobs += d.logprobs
                    if d.finish_reason:
                        o.finish_reason, o.stop_reason = d.finish_reason, d.stop_reason
                if out.finished:
                    bar.update(1)
        bar.close()
        return [results[r] for r in order]

    def encode(self, inputs: list[PoolingInput] | list[list[int]],
               params: PoolingParams | None = None) -> list[PoolingOutput]:
        """Pool every input (token ids, or ``PoolingInput`` with segment ids); input order."""
        params = params or PoolingParams()
        self.processor.check_pooling(params)
        rids = []
        for x in inputs:
            rid = str(next(self._ids))
            inp = x if isinstance(x, PoolingInput) else PoolingInput(list(x))
            spec = self.processor.pooling_request(rid, inp, params)
            self.outputs.add(spec)
            rids.append(rid)
            self.engine.add_request(spec)
        got: dict[str, PoolingOutput] = {}
        while self.engine.has_work:
            for rid, pooled in self.outputs.process(self.engine.step()).pooled:
                got[rid] = pooled
        return [got[r] for r in rids]
