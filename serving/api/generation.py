"""From a validated request to engine outputs: checks, SamplingParams, and the engine stream.

Both generation routes (completions, chat) go through here:

1. ``check_unsupported`` refuses fields this server does not implement (400 naming the field);
2. ``build_sampling_params`` maps request fields and the model's generation defaults onto
   ``SamplingParams`` (with the checks only the API can make: its own limits and field forms);
   ``request_grammar`` reads the structured-output fields into one spec and compiles it in the
   worker pool (a grammar error is a 400 before the engine sees the request);
3. ``make_requests`` has the engine validate each prompt with its params, once
   (``EngineClient.make_request``: ranges, vocabulary, truncation, the context length, the KV
   pool), before any response starts: a refusal is a 400 naming the field, in the API's names;
   with ``--reasoning-parser``, a grammar waits for the end of the reasoning unless the prompt
   already ended it (vLLM's rule, on both routes);
4. ``engine_stream`` submits those requests and yields ``(prompt_index, output)`` as they
   arrive. Closing it (client disconnect → Sanic cancels the handler task; or an error) closes
   every engine iterator, which aborts the engine requests and frees their KV pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Any

from serving.api.errors import BadRequest, InternalError, ServiceUnavailable
from serving.api.metrics import RequestMetrics, ServerMetrics
from serving.api.protocol import (
    MAX_STOP_SEQUENCES,
    MAX_STOP_STRING_CHARS,
    UNSUPPORTED_SAMPLING,
    SamplingFields,
)
from serving.api.reasoning import ReasoningParser, get_reasoning_parser
from serving.api.structured import compile_grammar
from serving.engine.outputs import RequestOutput
from serving.engine.request import EngineRequest
from serving.engine.sampling_params import SamplingParams, StructuredSpec
from serving.engine.structured_output import CompiledGrammar

logger = logging.getLogger("xlaserve.api")

# Sampling fields that default to the model's generation_config.json when the request omits them.
DEFAULTABLE = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
               "repetition_penalty": 1.0}


@dataclass
class Prompt:
    token_ids: list[int]
    text: str | None = None  # the prompt text when the client sent text (used by echo)


def check_unsupported(req: Any, table: Mapping[str, str]) -> None:
    for name, why in table.items():
        value = getattr(req, name, None)
        if value is None or value is False or value == [] or value == {}:
            continue
        raise BadRequest(why, param=name)


def check_common(req: SamplingFields, max_n: int, max_logprobs: int) -> None:
    """Checks shared by both generation APIs that do not depend on the prompt
    (``max_n``, ``max_logprobs``: the server's ``--max-n`` and ``--max-logprobs``)."""
    check_unsupported(req, UNSUPPORTED_SAMPLING)
    if req.cache_salt is not None and not req.cache_salt:
        raise BadRequest("Parameter 'cache_salt' must be a non-empty string if provided.",
                         param="cache_salt")
    if req.best_of is not None and req.best_of != req.n:
        raise BadRequest("best_of is not supported (it must be unset or equal to n).",
                         param="best_of")
    if req.length_penalty != 1.0:
        raise BadRequest("length_penalty only applies to beam search, which is not supported.",
                         param="length_penalty")
    if req.priority != 0:
        raise BadRequest("priority scheduling is not enabled on this server; priority must be 0.",
                         param="priority")
    if req.service_tier not in (None, "auto", "default"):
        raise BadRequest(f"service_tier '{req.service_tier}' is not supported.",
                         param="service_tier")
    if req.n > max_n:
        raise BadRequest(f"n must be at most {max_n} on this server, got {req.n}.", param="n")
    if req.stream_options is not None and not req.stream:
        opts = req.stream_options
        if opts.include_usage or opts.continuous_usage_stats:
            raise BadRequest("Stream options can only be defined when `stream=True`.",
                             param="stream_options")
    if req.stream and req.prompt_logprobs is not None:
        raise BadRequest("`prompt_logprobs` are not available when `stream=True`.",
                         param="prompt_logprobs")
    if req.prompt_logprobs is not None and req.prompt_logprobs < 0:
        raise BadRequest(f"prompt_logprobs must be a positive value or 0, got "
                         f"{req.prompt_logprobs}.", param="prompt_logprobs")
    if req.prompt_logprobs is not None and req.prompt_logprobs > max_logprobs:
        raise BadRequest(f"Requested prompt logprobs of {req.prompt_logprobs}, which is greater "
                         f"than max allowed: {max_logprobs}", param="prompt_logprobs")


def _stop_list(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_SEQUENCES:
        raise BadRequest(f"stop may hold at most {MAX_STOP_SEQUENCES} strings, got {len(stops)}.",
                         param="stop")
    for s in stops:
        if not s:
            raise BadRequest("stop cannot contain an empty string.", param="stop")
        if len(s) > MAX_STOP_STRING_CHARS:
            raise BadRequest(f"each stop string may be at most {MAX_STOP_STRING_CHARS} characters.",
                             param="stop")
    return stops


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            out[int(key)] = float(value)
        except ValueError:
            raise BadRequest(f"logit_bias keys must be token ids (integers), got {key!r}.",
                             param="logit_bias") from None
    return out


def build_sampling_params(req: SamplingFields, *, defaults: Mapping[str, Any],
                          logprobs: int | None, max_logprobs: int,
                          max_tokens: int | None,
                          structured: StructuredSpec | None = None) -> SamplingParams:
    """SamplingParams for ``req``; the engine validates them with each prompt
    (``make_requests``). ``max_tokens`` None: up to the context length. ``structured``: the
    request's output constraint (``serving.api.structured.structured_spec``).

    Precedence for temperature, top_p, top_k, min_p and repetition_penalty: the request, then
    the model's generation_config defaults, then the neutral value (as vLLM).
    """
    def pick(name: str) -> Any:
        value = getattr(req, name)
        return value if value is not None else defaults.get(name, DEFAULTABLE[name])

    if logprobs is not None and logprobs > max_logprobs:
        raise BadRequest(f"Requested sample logprobs of {logprobs}, which is greater than max "
                         f"allowed: {max_logprobs}", param="logprobs")
    return SamplingParams(
        n=req.n,
        temperature=float(pick("temperature")),
        top_p=float(pick("top_p")),
        top_k=int(pick("top_k")),
        min_p=float(pick("min_p")),
        repetition_penalty=float(pick("repetition_penalty")),
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        seed=req.seed,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        stop=_stop_list(req.stop),
        stop_token_ids=list(req.stop_token_ids or []),
        include_stop_str_in_output=req.include_stop_str_in_output,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=req.prompt_logprobs,
        logit_bias=_logit_bias(req.logit_bias),
        skip_special_tokens=req.skip_special_tokens,
        spaces_between_special_tokens=req.spaces_between_special_tokens,
        truncate_prompt_tokens=req.truncate_prompt_tokens,
        structured=structured,
    )


async def request_grammar(engine: Any, spec: StructuredSpec | None, pool: Executor
                          ) -> CompiledGrammar | None:
    """``spec`` compiled by the engine's grammar backend in ``pool``, the API's worker pool
    (never on the event loop or the engine thread; a cached grammar costs a dictionary lookup).
    A grammar that does not compile is a 400 "Grammar error: ..."; so is any constraint on an
    engine that cannot build grammars."""
    if spec is None:
        return None
    if engine.grammars is None:
        raise BadRequest("Structured outputs are not available for this model (it has no "
                         "tokenizer to build grammars over).", param="structured_outputs")
    return await compile_grammar(engine.grammars, spec, pool)


def new_reasoning_parser(name: str | None, tokenizer: Any) -> ReasoningParser | None:
    """A fresh ``--reasoning-parser`` (one per choice: parsers keep streaming state)."""
    return None if name is None else get_reasoning_parser(name)(tokenizer)


def make_requests(engine: Any, prompts: list[Prompt], params: list[SamplingParams],
                  base_id: str, *, cache_salt: str | None = None,
                  names: Mapping[str, str] | None = None,
                  grammar: CompiledGrammar | None = None,
                  reasoning: ReasoningParser | None = None) -> list[EngineRequest]:
    """One validated engine request per prompt (``EngineClient.make_request``); a refusal is a
    400 whose ``param`` is the engine's field name, or its API name from ``names`` (chat:
    ``max_tokens`` may be ``max_completion_tokens``, the prompt is ``messages``). A truncated
    prompt's ``Prompt`` gets the ids actually used (and no text: echo shows those tokens).
    ``grammar``: the params' compiled structured-output constraint (``request_grammar``);
    ``reasoning``: the server's reasoning parser, whose end marker gates the grammar unless the
    (truncated) prompt already ended the reasoning."""
    suffix = secrets.token_hex(4)  # engine ids stay unique even when clients reuse request ids
    out = []
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        try:
            spec = engine.make_request(f"{base_id}-{i}-{suffix}", p.token_ids, sp,
                                       cache_salt=cache_salt, grammar=grammar)
        except ValueError as e:
            param = getattr(e, "param", None)
            raise BadRequest(str(e), param=(names or {}).get(param or "", param)) from None
        if grammar is not None and reasoning is not None and \
                not reasoning.is_reasoning_end(spec.prompt_ids):
            spec = replace(spec, grammar_after=reasoning.end_token)
        if len(spec.prompt_ids) != len(p.token_ids):
            p.token_ids, p.text = list(spec.prompt_ids), None
        out.append(spec)
    return out


def finish_label(reasons: list[str | None]) -> str:
    """One label per engine request for ``request_success``: the worst of its choices."""
    for bad in ("error", "abort"):
        if bad in reasons:
            return bad
    if not reasons or any(r is None for r in reasons):
        return "abort"  # closed before every choice finished: the client went away
    return reasons[0] or "abort"


async def _tracked(engine: Any, gen: AsyncIterator[RequestOutput], rm: RequestMetrics,
                   n: int) -> AsyncGenerator[RequestOutput, None]:
    """Observe metrics on the way through; a dead engine is a 503."""
    reasons: list[str | None] = [None] * n
    generated = [0] * n
    try:
        try:
            async for out in gen:
                new = 0
                for d in out.outputs:
                    new += len(d.token_ids)
                    if 0 <= d.index < n:
                        generated[d.index] = max(generated[d.index], d.num_generated)
                        if d.finish_reason is not None:
                            reasons[d.index] = d.finish_reason
                rm.output(new)
                yield out
        except (RuntimeError, ConnectionError) as e:
            if not engine.is_healthy():
                raise ServiceUnavailable("The engine has stopped; the server cannot generate."
                                         ) from e
            raise
    finally:
        rm.finish(finish_label(reasons), sum(generated))
        close = getattr(gen, "aclose", None)
        if close is not None:
            with contextlib.suppress(Exception):
                await close()


async def engine_stream(engine: Any, metrics: ServerMetrics, requests: list[EngineRequest]
                        ) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """Yield ``(prompt_index, output)`` for every engine output of every request.

    Must be closed by the caller (``contextlib.aclosing``): closing cancels the pumps and closes
    each engine iterator, which aborts the unfinished engine requests.
    """
    arrival = time.monotonic()
    gens = [_tracked(engine, engine.generate(spec),
                     RequestMetrics(metrics, arrival, spec.prompt_len), spec.n)
            for spec in requests]
    if len(gens) == 1:
        try:
            async for out in gens[0]:
                yield 0, out
        finally:
            await gens[0].aclose()
        return

    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, gen: AsyncGenerator[RequestOutput, None]) -> None:
        try:
            async for out in gen:
                queue.put_nowait((i, out))
            queue.put_nowait((i, None))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # handed to the consumer, which raises it
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for g in gens:
            with contextlib.suppress(Exception):
                await g.aclose()


def raise_on_engine_error(out: RequestOutput) -> None:
    """A request the engine failed (finish_reason "error") is a 500; details go to the log."""
    if out.error is not None or any(d.finish_reason == "error" for d in out.outputs):
        logger.error("Engine failed request %s: %s", out.request_id, out.error)
        raise InternalError("Internal server error: the engine failed while generating this "
                            "request.")
