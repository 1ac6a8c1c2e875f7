"""``POST /v1/completions``: OpenAI legacy completions, JSON or SSE.

Prompt forms: a string, a list of strings, a list of token ids, or a list of token-id lists; each
prompt yields ``n`` choices, numbered prompt-major (``index = prompt * n + choice``). ``echo``
prepends the prompt (and, with ``logprobs``, its logprobs, the first one null); with ``echo``,
``max_tokens: 0`` returns the prompt alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, replace

from sanic import Blueprint, HTTPResponse, Request

from serving.api.body import parse_request
from serving.api.errors import APIError, BadRequest
from serving.api.generation import (
    Prompt,
    build_sampling_params,
    check_common,
    check_unsupported,
    engine_stream,
    make_requests,
    new_reasoning_parser,
    raise_on_engine_error,
    request_grammar,
)
from serving.api.logprobs import LogprobFormatter
from serving.api.protocol import (
    MAX_PROMPTS,
    UNSUPPORTED_COMPLETION,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChoice,
    CompletionStreamResponse,
    PromptTokensDetails,
    UsageInfo,
)
from serving.api.routes.common import (
    ChoiceAccumulator,
    admitted,
    json_response,
    request_id_for,
    state_of,
)
from serving.api.state import ServerState
from serving.api.streaming import SSEWriter
from serving.api.structured import structured_spec
from serving.engine.outputs import TokenLogprob
from serving.engine.request import EngineRequest

logger = logging.getLogger("xlaserve.api")
bp = Blueprint("completions")


@dataclass
class _Plan:
    """Everything decided before the engine is called."""

    req: CompletionRequest
    model: str
    response_id: str
    created: int
    prompts: list[Prompt]
    requests: list[EngineRequest]  # one validated engine request per prompt
    echo_only: bool  # echo with max_tokens 0: the prompt is the whole answer


async def _tokenize_prompts(state: ServerState, req: CompletionRequest) -> list[Prompt]:
    engine = state.require_generate("Completions API")
    p = req.prompt
    empty = BadRequest("Either prompt or prompt_embeds must be provided and non-empty.",
                       param="prompt")
    if p is None or p == "" or p == []:
        raise empty
    raw: list[str | list[int]]
    if isinstance(p, str):
        raw = [p]
    elif all(isinstance(x, int) for x in p):
        raw = [p]  # type: ignore[list-item]
    else:
        raw = list(p)  # type: ignore[arg-type]
    if len(raw) > MAX_PROMPTS:
        raise BadRequest(f"At most {MAX_PROMPTS} prompts per request, got {len(raw)}.",
                         param="prompt")
    tok = engine.tokenizer
    prompts = []
    for item in raw:
        if isinstance(item, str):
            if not item:
                raise empty
            ids = await state.off_loop(tok.encode, item, add_special_tokens=req.add_special_tokens)
            text: str | None = item
        else:
            if not item:
                raise empty
            ids, text = list(item), None
        prompts.append(Prompt(ids, text))
    return prompts


async def _plan(request: Request, state: ServerState) -> _Plan:
    req = parse_request(request, CompletionRequest)
    model = state.resolve_model(req.model)
    engine = state.require_generate("Completions API")
    check_unsupported(req, UNSUPPORTED_COMPLETION)
    check_common(req, state.args.max_n, state.args.max_logprobs)
    if req.logprobs is not None and req.logprobs < 0:
        raise BadRequest("`logprobs` must be a positive value.", param="logprobs")
    if req.max_tokens == 0 and not req.echo:
        raise BadRequest("max_tokens must be at least 1, got 0 (0 is allowed only with echo).",
                         param="max_tokens")
    echo_only = req.echo and req.max_tokens == 0
    structured = structured_spec(req)
    base = build_sampling_params(req, defaults=engine.generation_defaults, logprobs=req.logprobs,
                                 max_logprobs=state.args.max_logprobs,
                                 max_tokens=1 if echo_only else req.max_tokens,
                                 structured=structured)
    grammar = await request_grammar(engine, structured, state.cpu_pool)
    prompts = await _tokenize_prompts(state, req)
    if len(prompts) * req.n > state.args.max_n:
        raise BadRequest(f"This request asks for {len(prompts) * req.n} choices "
                         f"({len(prompts)} prompts × n={req.n}); the server allows at most "
                         f"{state.args.max_n}.", param="n")
    if req.echo and req.logprobs is not None:
        # echo + logprobs shows the prompt's logprobs too (vLLM: prompt_logprobs := logprobs).
        base = replace(base, prompt_logprobs=max(base.prompt_logprobs or 0, req.logprobs))
    rid = request_id_for(request, req.request_id)
    response_id = f"cmpl-{rid}"
    requests = make_requests(engine, prompts, [base] * len(prompts), response_id,
                             cache_salt=req.cache_salt, grammar=grammar,
                             reasoning=new_reasoning_parser(state.args.reasoning_parser,
                                                            engine.tokenizer))
    for p in prompts:
        if req.echo and p.text is None:
            p.text = await state.off_loop(engine.tokenizer.decode, p.token_ids)
    return _Plan(req, model, response_id, int(time.time()), prompts, requests, echo_only)


@bp.post("/v1/completions")
@admitted
async def create_completion(request: Request) -> HTTPResponse | None:
    state = state_of(request)
    plan = await _plan(request, state)
    request.ctx.admission.settle(sum(len(p.token_ids) for p in plan.prompts))
    if plan.req.stream:
        await _stream(request, state, plan)
        return None
    return await _full(state, plan)


def _usage(plan: _Plan, completion_tokens: int, cached: int) -> UsageInfo:
    prompt_tokens = sum(len(p.token_ids) for p in plan.prompts)
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def _needs_engine(plan: _Plan) -> bool:
    return not (plan.echo_only and plan.req.logprobs is None and plan.req.prompt_logprobs is None)


async def _full(state: ServerState, plan: _Plan) -> HTTPResponse:
    req, n = plan.req, plan.req.n
    engine = state.require_generate("Completions API")
    assert state.tokens is not None and state.metrics is not None
    fmt = LogprobFormatter(state.tokens, as_ids=bool(req.return_tokens_as_token_ids
                                                     or state.args.return_tokens_as_token_ids))
    choices = [[ChoiceAccumulator() for _ in range(n)] for _ in plan.prompts]
    prompt_lps: list[list[TokenLogprob | None] | None] = [None] * len(plan.prompts)
    cached = [0] * len(plan.prompts)
    if _needs_engine(plan):
        stream = engine_stream(engine, state.metrics, plan.requests)
        async with contextlib.aclosing(stream) as outputs:
            async for i, out in outputs:
                raise_on_engine_error(out)
                if out.prompt_logprobs is not None:
                    prompt_lps[i] = out.prompt_logprobs
                cached[i] = max(cached[i], out.num_cached_tokens)
                for d in out.outputs:
                    c = choices[i][d.index]
                    c.token_ids.extend(d.token_ids)
                    c.text.append(d.text)
                    if d.logprobs:
                        c.logprobs.extend(d.logprobs)
                    if d.finish_reason is not None:
                        c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
        for row in choices:
            for c in row:
                # The engine ended the request without finishing this choice (shutdown).
                c.finish_reason = c.finish_reason or "abort"
    out_choices = []
    completion_tokens = 0
    for i, prompt in enumerate(plan.prompts):
        for j, c in enumerate(choices[i]):
            if plan.echo_only:
                c = ChoiceAccumulator(finish_reason="length")
            completion_tokens += len(c.token_ids)
            text = "".join(c.text)
            logprobs = None
            if req.logprobs is not None:
                entries: list[TokenLogprob | None] = []
                ids: list[int] = []
                if req.echo:
                    entries.extend(_prompt_entries(prompt_lps[i], len(prompt.token_ids)))
                    ids.extend(prompt.token_ids)
                entries.extend(c.logprobs if c.logprobs else [None] * len(c.token_ids))
                ids.extend(c.token_ids)
                logprobs, _ = fmt.completion(entries, ids, req.logprobs, 0)
            if req.echo:
                text = (prompt.text or "") + text
            out_choices.append(CompletionChoice(
                index=i * n + j, text=text, logprobs=logprobs,
                finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                prompt_logprobs=(fmt.prompt(prompt_lps[i], req.prompt_logprobs)
                                 if req.prompt_logprobs is not None else None),
                prompt_token_ids=prompt.token_ids if req.return_token_ids else None,
                token_ids=c.token_ids if req.return_token_ids else None))
    return json_response(CompletionResponse(
        id=plan.response_id, created=plan.created, model=plan.model, choices=out_choices,
        usage=_usage(plan, completion_tokens, sum(cached))))


def _prompt_entries(lps: list[TokenLogprob | None] | None,
                    length: int) -> list[TokenLogprob | None]:
    if lps is None:
        return [None] * length
    entries = list(lps[:length])
    return entries + [None] * (length - len(entries))


async def _stream(request: Request, state: ServerState, plan: _Plan) -> None:
    req, n = plan.req, plan.req.n
    engine = state.require_generate("Completions API")
    assert state.tokens is not None and state.metrics is not None
    fmt = LogprobFormatter(state.tokens, as_ids=bool(req.return_tokens_as_token_ids
                                                     or state.args.return_tokens_as_token_ids))
    opts = req.stream_options
    include_usage = bool(opts and opts.include_usage) or state.args.enable_force_include_usage
    continuous = include_usage and bool(opts and opts.continuous_usage_stats)
    started: set[int] = set()
    offsets: dict[int, int] = {}
    generated: dict[int, int] = {}
    prompt_lps: dict[int, list[TokenLogprob | None]] = {}
    cached = [0] * len(plan.prompts)
    finished: set[int] = set()

    def chunk(i: int, idx: int, text: str, ids: list[int], lp_ids: list[int],
              entries: list[TokenLogprob | None], finish: str | None,
              stop: int | str | None) -> str:
        """One SSE payload; ``lp_ids``/``entries`` include the echoed prompt, ``ids`` not."""
        logprobs: CompletionLogprobs | None = None
        if req.logprobs is not None:
            logprobs, offsets[idx] = fmt.completion(entries, lp_ids, req.logprobs,
                                                    offsets.get(idx, 0))
        usage = None
        if continuous:
            p = len(plan.prompts[i].token_ids)
            usage = UsageInfo(prompt_tokens=p, completion_tokens=generated.get(idx, 0),
                              total_tokens=p + generated.get(idx, 0))
        first = idx not in started
        started.add(idx)
        return CompletionStreamResponse(
            id=plan.response_id, created=plan.created, model=plan.model, usage=usage,
            choices=[CompletionStreamChoice(
                index=idx, text=text, logprobs=logprobs, finish_reason=finish, stop_reason=stop,
                prompt_token_ids=(plan.prompts[i].token_ids
                                  if req.return_token_ids and first else None),
                token_ids=ids if req.return_token_ids else None)],
        ).model_dump_json()

    writer = SSEWriter(request)
    await writer.open()
    try:
        if _needs_engine(plan):
            stream = engine_stream(engine, state.metrics, plan.requests)
            async with contextlib.aclosing(stream) as outputs:
                async for i, out in outputs:
                    raise_on_engine_error(out)
                    if out.prompt_logprobs is not None:
                        prompt_lps[i] = out.prompt_logprobs
                    cached[i] = max(cached[i], out.num_cached_tokens)
                    for d in out.outputs:
                        idx = i * n + d.index
                        text, ids = d.text, list(d.token_ids)
                        entries: list[TokenLogprob | None] = list(
                            d.logprobs if d.logprobs else [None] * len(ids))
                        finish, stop = d.finish_reason, d.stop_reason
                        if plan.echo_only:
                            text, ids, entries, finish, stop = "", [], [], "length", None
                            if idx in started:
                                continue
                        else:
                            generated[idx] = generated.get(idx, 0) + len(ids)
                        lp_ids = ids
                        if req.echo and idx not in started:
                            prompt = plan.prompts[i]
                            text = (prompt.text or "") + text
                            entries = _prompt_entries(prompt_lps.get(i),
                                                      len(prompt.token_ids)) + entries
                            lp_ids = list(prompt.token_ids) + ids
                        if not text and not lp_ids and finish is None:
                            continue  # nothing new for this choice (vLLM skips these too)
                        await writer.send(chunk(i, idx, text, ids, lp_ids, entries, finish,
                                                stop))
                        if finish is not None:
                            finished.add(idx)
            # Choices the engine ended without a finish (shutdown) still get their one
            # finish chunk.
            for idx in range(len(plan.prompts) * n):
                if idx not in finished:
                    await writer.send(chunk(idx // n, idx, "", [], [], [], "abort", None))
        else:
            for i, prompt in enumerate(plan.prompts):
                for j in range(n):
                    await writer.send(chunk(i, i * n + j, prompt.text or "", [], [], [],
                                            "length", None))
        if include_usage:
            completion = sum(generated.values())
            await writer.send(CompletionStreamResponse(
                id=plan.response_id, created=plan.created, model=plan.model, choices=[],
                usage=_usage(plan, completion, sum(cached))).model_dump_json())
    except asyncio.CancelledError:
        raise  # the client went away; aclosing above already aborted the engine requests
    except APIError as e:
        await writer.error(e.status, e.message)
    except Exception:
        logger.exception("Streaming completion %s failed", plan.response_id)
        await writer.error(500, "Internal server error. The server logged the details.")
    await writer.done()
