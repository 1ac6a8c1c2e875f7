"""``POST /tokenize`` and ``POST /detokenize`` (vLLM's shapes).

``/tokenize`` takes either ``prompt`` (encoded with ``add_special_tokens``, default True) or chat
``messages`` (rendered with the chat template exactly as ``/v1/chat/completions`` would, then
encoded with ``add_special_tokens``, default False). It does not check the context length.
"""

from __future__ import annotations

from sanic import Blueprint, HTTPResponse, Request

from serving.api.body import parse_json_object, validate_model
from serving.api.errors import BadRequest
from serving.api.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from serving.api.routes.chat import check_template_trust, render_prompt
from serving.api.routes.common import json_response, state_of
from serving.api.tool_parsers.tool_choice import validate_tools

bp = Blueprint("tokenize")


@bp.post("/tokenize")
async def tokenize(request: Request) -> HTTPResponse:
    state = state_of(request)
    body = parse_json_object(request)
    req: TokenizeChatRequest | TokenizeCompletionRequest
    if "messages" in body:
        req = validate_model(TokenizeChatRequest, body)
    elif "prompt" in body:
        req = validate_model(TokenizeCompletionRequest, body)
    else:
        raise BadRequest("Either `prompt` or `messages` must be given.", param="prompt")
    state.resolve_model(req.model)
    engine = state.require_engine()
    assert state.tokens is not None
    if isinstance(req, TokenizeChatRequest):
        if req.mm_processor_kwargs is not None:
            raise BadRequest("mm_processor_kwargs is not supported (text-only models).",
                             param="mm_processor_kwargs")
        check_template_trust(state, req.chat_template, req.chat_template_kwargs)
        kwargs = dict(req.chat_template_kwargs or {})
        template = req.chat_template or kwargs.pop("chat_template", None)
        text = await render_prompt(state, req.messages,
                                   add_generation_prompt=req.add_generation_prompt,
                                   continue_final_message=req.continue_final_message,
                                   documents=req.documents, template_kwargs=kwargs,
                                   template=template,
                                   tools=validate_tools(req.tools) or None)
    else:
        text = req.prompt
    ids = await state.off_loop(engine.tokenizer.encode, text,
                               add_special_tokens=req.add_special_tokens)
    return json_response(TokenizeResponse(
        count=len(ids), max_model_len=engine.max_model_len, tokens=ids,
        token_strs=state.tokens.token_strs(ids) if req.return_token_strs else None))


@bp.post("/detokenize")
async def detokenize(request: Request) -> HTTPResponse:
    state = state_of(request)
    req = validate_model(DetokenizeRequest, parse_json_object(request))
    state.resolve_model(req.model)
    engine = state.require_engine()
    for t in req.tokens:
        if not 0 <= t < engine.vocab_size:
            raise BadRequest(f"Token id {t} is out of vocabulary (vocabulary size "
                             f"{engine.vocab_size}).", param="tokens")
    text = await state.off_loop(engine.tokenizer.decode, req.tokens)
    return json_response(DetokenizeResponse(prompt=text))
