"""``POST /v1/chat/completions``: OpenAI chat completions, JSON or SSE.

Messages are rendered with the chat template (``serving.api.chat_template``, off the event loop,
time-limited), tokenized with ``add_special_tokens`` (default False: the template writes its own
special tokens), then generated like a completion. A stream opens with one role chunk per choice
(``delta: {"role": "assistant", "content": ""}``), carries content deltas, and has exactly one
chunk with a finish_reason per choice. Tools (``serving.api.tool_output``): a named or
``required`` ``tool_choice`` constrains the output with a JSON schema and turns it into
``tool_calls``; ``auto`` reads calls out of free text with the server's tool-call parser.
Reasoning (``--reasoning-parser``): the output splits into ``reasoning_content`` and content
before any tool handling (``serving.api.chat_output``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from sanic import Blueprint, HTTPResponse, Request

from serving.api.body import parse_request
from serving.api.chat_output import ChoiceStream, OutputPlan, choice_message
from serving.api.chat_template import ChatTemplateError
from serving.api.errors import APIError, BadRequest, ServiceUnavailable
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
    UNSUPPORTED_CHAT,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatLogprobs,
    ChatLogprobToken,
    ChatMessage,
    ChatMessageOut,
    ChatStreamChoice,
    DeltaMessage,
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
from serving.api.structured import structured_spec, with_tool_constraint
from serving.api.template_worker import TemplateWorkersBusy
from serving.api.tool_output import StreamDelta, plan_tools
from serving.engine.outputs import TokenLogprob
from serving.engine.request import EngineRequest

logger = logging.getLogger("xlaserve.api")
bp = Blueprint("chat")

UNTRUSTED_TEMPLATE = ("Chat template is passed with request, but --trust-request-chat-template "
                      "is not set. Refused request with untrusted chat template.")


@dataclass
class _Plan:
    req: ChatCompletionRequest
    model: str
    response_id: str
    created: int
    prompt: Prompt
    request: EngineRequest  # validated by the engine
    role: str
    echo_text: str  # prepended to each choice's content (echo of the final message)
    top_logprobs: int | None  # None: no logprobs
    output: OutputPlan  # tools and reasoning


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    return [m.model_dump() for m in messages]


def check_template_trust(state: ServerState, template: str | None,
                         kwargs: dict[str, Any] | None) -> None:
    """A request may bring its own template only when the operator trusts request templates."""
    if (template is not None or (kwargs and "chat_template" in kwargs)) \
            and not state.args.trust_request_chat_template:
        raise BadRequest(UNTRUSTED_TEMPLATE, param="chat_template")


async def render_prompt(state: ServerState, messages: list[ChatMessage], *,
                        add_generation_prompt: bool, continue_final_message: bool,
                        documents: list[dict[str, str]] | None,
                        template_kwargs: dict[str, Any] | None, template: str | None,
                        tools: list[dict[str, Any]] | None = None) -> str:
    if state.renderer is None:
        raise ServiceUnavailable("The model is still loading; retry soon.")
    try:
        return await state.renderer.render(
            message_dicts(messages), add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, documents=documents,
            template_kwargs=template_kwargs, template=template, tools=tools)
    except ChatTemplateError as e:
        raise BadRequest(str(e), param="messages") from None
    except TemplateWorkersBusy as e:
        raise ServiceUnavailable(str(e)) from None


def _final_text(message: ChatMessage) -> str:
    c = message.content
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        return "\n".join(p.text for p in c if isinstance(p.text, str))
    return ""


async def _plan(request: Request, state: ServerState) -> _Plan:
    req = parse_request(request, ChatCompletionRequest)
    model = state.resolve_model(req.model)
    engine = state.require_generate("Chat Completions API")
    check_unsupported(req, UNSUPPORTED_CHAT)
    check_common(req, state.args.max_n, state.args.max_logprobs)
    tools, tool_spec = plan_tools(req.tools, req.tool_choice, state.args)
    if req.store:
        raise BadRequest("store is not supported (this server stores nothing).", param="store")
    if req.modalities not in (None, [], ["text"]):
        raise BadRequest("modalities other than text are not supported.", param="modalities")
    if not req.include_reasoning and state.args.reasoning_parser is None:
        raise BadRequest("include_reasoning: false needs a reasoning parser (the server's "
                         "--reasoning-parser): without one the model's reasoning stays in "
                         "`content`.", param="include_reasoning")
    if req.top_logprobs is not None and req.top_logprobs != 0 and not req.logprobs:
        raise BadRequest("when using `top_logprobs`, `logprobs` must be set to true.",
                         param="top_logprobs")
    if req.top_logprobs is not None and req.top_logprobs < 0:
        raise BadRequest(f"top_logprobs must be in [0, {state.args.max_logprobs}], got "
                         f"{req.top_logprobs}.", param="top_logprobs")
    top = (req.top_logprobs or 0) if req.logprobs else None
    check_template_trust(state, req.chat_template, req.chat_template_kwargs)
    requested: int | None
    if req.max_completion_tokens is not None:
        requested, pname = req.max_completion_tokens, "max_completion_tokens"
    else:
        requested, pname = req.max_tokens, "max_tokens"
    if requested is not None and requested < 1:
        raise BadRequest(f"{pname} must be at least 1, got {requested}.", param=pname)
    structured = with_tool_constraint(structured_spec(req), tool_spec)
    base = build_sampling_params(req, defaults=engine.generation_defaults, logprobs=top,
                                 max_logprobs=state.args.max_logprobs, max_tokens=requested,
                                 structured=structured)
    grammar = await request_grammar(engine, structured, state.cpu_pool)
    kwargs = dict(req.chat_template_kwargs or {})
    kwargs.pop("chat_template", None)
    if req.reasoning_effort is not None:
        kwargs.setdefault("reasoning_effort", req.reasoning_effort)
    text = await render_prompt(state, req.messages,
                               add_generation_prompt=req.add_generation_prompt,
                               continue_final_message=req.continue_final_message,
                               documents=req.documents, template_kwargs=kwargs,
                               template=req.chat_template or
                               (req.chat_template_kwargs or {}).get("chat_template"),
                               tools=tools.template_tools)
    ids = await state.off_loop(engine.tokenizer.encode, text,
                               add_special_tokens=req.add_special_tokens)
    rid = request_id_for(request, req.request_id)
    prompt = Prompt(ids, text)
    (spec,) = make_requests(engine, [prompt], [base], f"chatcmpl-{rid}",
                            cache_salt=req.cache_salt,
                            names={"max_tokens": pname, "prompt": "messages"}, grammar=grammar,
                            reasoning=new_reasoning_parser(state.args.reasoning_parser,
                                                           engine.tokenizer))
    role = state.args.response_role if req.add_generation_prompt else req.messages[-1].role
    echo_text = ""
    if req.echo and req.messages[-1].role == role:
        echo_text = _final_text(req.messages[-1])
    output = OutputPlan(tools, state.args.reasoning_parser, req.include_reasoning)
    return _Plan(req, model, f"chatcmpl-{rid}", int(time.time()), prompt, spec, role, echo_text,
                 top, output)


@bp.post("/v1/chat/completions")
@admitted
async def create_chat_completion(request: Request) -> HTTPResponse | None:
    state = state_of(request)
    plan = await _plan(request, state)
    request.ctx.admission.settle(len(plan.prompt.token_ids))
    if plan.req.stream:
        await _stream(request, state, plan)
        return None
    return await _full(state, plan)


def _formatter(state: ServerState, plan: _Plan) -> LogprobFormatter:
    assert state.tokens is not None
    return LogprobFormatter(state.tokens, as_ids=bool(plan.req.return_tokens_as_token_ids
                                                      or state.args.return_tokens_as_token_ids))


async def _full(state: ServerState, plan: _Plan) -> HTTPResponse:
    req, n = plan.req, plan.req.n
    engine = state.require_generate("Chat Completions API")
    assert state.metrics is not None
    fmt = _formatter(state, plan)
    choices = [ChoiceAccumulator() for _ in range(n)]
    prompt_lps: list[TokenLogprob | None] | None = None
    cached = 0
    stream = engine_stream(engine, state.metrics, [plan.request])
    async with contextlib.aclosing(stream) as outputs:
        async for _, out in outputs:
            raise_on_engine_error(out)
            if out.prompt_logprobs is not None:
                prompt_lps = out.prompt_logprobs
            cached = max(cached, out.num_cached_tokens)
            for d in out.outputs:
                c = choices[d.index]
                c.token_ids.extend(d.token_ids)
                c.text.append(d.text)
                if d.logprobs:
                    c.logprobs.extend(d.logprobs)
                if d.finish_reason is not None:
                    c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
    for c in choices:
        c.finish_reason = c.finish_reason or "abort"  # ended without a finish: shutdown
    out_choices = []
    for j, c in enumerate(choices):
        logprobs = None
        if plan.top_logprobs is not None:
            logprobs = ChatLogprobs(content=fmt.chat(c.logprobs, plan.top_logprobs))
        msg = choice_message(plan.output, "".join(c.text), c.finish_reason, engine.tokenizer,
                             plan.echo_text)
        out_choices.append(ChatChoice(
            index=j, message=ChatMessageOut(role=plan.role, content=msg.content,
                                            tool_calls=msg.tool_calls,
                                            reasoning_content=msg.reasoning_content),
            logprobs=logprobs, finish_reason=msg.finish_reason, stop_reason=c.stop_reason,
            token_ids=c.token_ids if req.return_token_ids else None))
    p = len(plan.prompt.token_ids)
    completion = sum(len(c.token_ids) for c in choices)
    return json_response(ChatCompletionResponse(
        id=plan.response_id, created=plan.created, model=plan.model, choices=out_choices,
        usage=UsageInfo(prompt_tokens=p, completion_tokens=completion, total_tokens=p + completion,
                        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached)),
        prompt_logprobs=(fmt.prompt(prompt_lps, req.prompt_logprobs)
                         if req.prompt_logprobs is not None else None),
        prompt_token_ids=plan.prompt.token_ids if req.return_token_ids else None))


async def _stream(request: Request, state: ServerState, plan: _Plan) -> None:
    req, n = plan.req, plan.req.n
    engine = state.require_generate("Chat Completions API")
    assert state.metrics is not None
    fmt = _formatter(state, plan)
    opts = req.stream_options
    include_usage = bool(opts and opts.include_usage) or state.args.enable_force_include_usage
    continuous = include_usage and bool(opts and opts.continuous_usage_stats)
    p = len(plan.prompt.token_ids)
    generated = [0] * n
    cached = 0
    finished: set[int] = set()
    shaped = [None if plan.output.plain else ChoiceStream(plan.output, engine.tokenizer)
              for _ in range(n)]

    def dump(choices: list[ChatStreamChoice], usage: UsageInfo | None = None,
             first: bool = False) -> str:
        fields: dict[str, Any] = dict(id=plan.response_id, object="chat.completion.chunk",
                                      created=plan.created, model=plan.model, choices=choices)
        if usage is not None:
            fields["usage"] = usage
        if first and req.return_token_ids:
            fields["prompt_token_ids"] = plan.prompt.token_ids
        return ChatCompletionStreamResponse(**fields).model_dump_json(exclude_unset=True)

    def usage_for(j: int) -> UsageInfo | None:
        if not continuous:
            return None
        return UsageInfo(prompt_tokens=p, completion_tokens=generated[j],
                         total_tokens=p + generated[j])

    writer = SSEWriter(request)
    await writer.open()
    try:
        for j in range(n):
            await writer.send(dump([ChatStreamChoice(
                index=j, delta=DeltaMessage(role=plan.role, content=""), logprobs=None,
                finish_reason=None)], usage_for(j), first=j == 0))
            if plan.echo_text:
                await writer.send(dump([ChatStreamChoice(
                    index=j, delta=DeltaMessage(content=plan.echo_text), logprobs=None,
                    finish_reason=None)], usage_for(j)))
        stream = engine_stream(engine, state.metrics, [plan.request])
        async with contextlib.aclosing(stream) as outputs:
            async for _, out in outputs:
                raise_on_engine_error(out)
                cached = max(cached, out.num_cached_tokens)
                for d in out.outputs:
                    if not d.text and not d.token_ids and d.finish_reason is None:
                        continue
                    generated[d.index] += len(d.token_ids)
                    logprobs = None
                    if plan.top_logprobs is not None:
                        entries: list[ChatLogprobToken] = fmt.chat(d.logprobs or [],
                                                                   plan.top_logprobs)
                        logprobs = ChatLogprobs(content=entries)
                    finish = d.finish_reason
                    cs = shaped[d.index]
                    if cs is None:
                        delta = DeltaMessage(content=d.text)
                    else:  # reasoning / tool calls: the step's pieces, then the final ones
                        pieces = [cs.step(d.text)]
                        if finish is not None:
                            pieces = [p for p in pieces if not p.empty] + cs.finish()
                            finish = cs.finish_reason(finish)
                        elif pieces[0].empty and not req.return_token_ids and logprobs is None:
                            continue  # held back by a parser: nothing to send yet
                        for early in pieces[:-1]:  # logprobs ride on the first chunk
                            await writer.send(dump([ChatStreamChoice(
                                index=d.index, delta=_delta(early), logprobs=logprobs)],
                                usage_for(d.index)))
                            logprobs = None
                        delta = _delta(pieces[-1]) if pieces else DeltaMessage()
                    choice = ChatStreamChoice(index=d.index, delta=delta,
                                              logprobs=logprobs, finish_reason=finish)
                    if d.finish_reason is not None:
                        choice.stop_reason = d.stop_reason
                    if req.return_token_ids:
                        choice.token_ids = list(d.token_ids)
                    await writer.send(dump([choice], usage_for(d.index)))
                    if d.finish_reason is not None:
                        finished.add(d.index)
        for j in range(n):
            if j not in finished:  # ended without a finish (shutdown): one finish chunk
                await writer.send(dump([ChatStreamChoice(
                    index=j, delta=DeltaMessage(content=""), logprobs=None,
                    finish_reason="abort")], usage_for(j)))
        if include_usage:
            completion = sum(generated)
            await writer.send(dump([], UsageInfo(
                prompt_tokens=p, completion_tokens=completion, total_tokens=p + completion,
                prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))))
    except asyncio.CancelledError:
        raise  # the client went away; aclosing above already aborted the engine request
    except APIError as e:
        await writer.error(e.status, e.message)
    except Exception:
        logger.exception("Streaming chat completion %s failed", plan.response_id)
        await writer.error(500, "Internal server error. The server logged the details.")
    await writer.done()


def _delta(d: StreamDelta) -> DeltaMessage:
    """A tool stream's step as a chat delta (unset fields stay out of the chunk)."""
    fields: dict[str, Any] = {}
    if d.reasoning_content is not None:
        fields["reasoning_content"] = d.reasoning_content
    if d.content is not None:
        fields["content"] = d.content
    if d.tool_calls:
        fields["tool_calls"] = list(d.tool_calls)
    return DeltaMessage(**fields)
