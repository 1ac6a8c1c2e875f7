"""The pooling APIs: ``/v1/embeddings``, ``/pooling``, ``/score``, ``/rerank``, ``/classify``.

Served when the engine serves pooling (``serve`` with a BERT-family model, or a decoder with
``--task embed``); on a generation model every route here answers 400 "The model does not
support <API>", as vLLM does, and the generation routes answer the same on a pooling model
(``ServerState.require_generate``).

- ``POST /v1/embeddings``: ``input`` as a string, strings, token ids or token-id lists, or chat
  ``messages`` rendered through the chat template; ``encoding_format`` float or base64
  (little-endian float32); ``dimensions`` only for Matryoshka models; usage counts the tokens
  pooled (after truncation).
- ``POST /pooling``: the same inputs; per-token hidden states (``[n_tokens][D]``) on embedding
  models, class probabilities on classifiers.
- ``POST /score`` (``/v1/score``): ``text_1``/``text_2`` paired 1:1, 1:N or N:N. A cross-encoder
  scores each pair with its head (sigmoid for single-label rerankers); an embedding model gives
  the cosine similarity of the two embeddings.
- ``POST /rerank`` (``/v1/rerank``, ``/v2/rerank``): ``query`` against ``documents`` scored as
  ``/score`` 1:N, sorted by relevance, cut to ``top_n`` (0: all).
- ``POST /classify``: class probabilities, label and class count per input (classifiers).

Every request is tokenized off the event loop, then handed to the engine as one ``encode`` call
(which validates it, once, before anything is queued: a ``ValueError`` is a 400 naming the
field), so its inputs share the engine's batched steps with other requests.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

import numpy as np
from sanic import Blueprint, HTTPResponse, Request

from serving.api.body import parse_json_object, validate_model
from serving.api.engine_protocol import PoolingEngineClient
from serving.api.errors import BadRequest, ServiceUnavailable
from serving.api.pooling_protocol import (
    MAX_POOLING_INPUTS,
    MAX_SCORE_TEXTS,
    ClassificationData,
    ClassificationRequest,
    ClassificationResponse,
    EmbeddingChatRequest,
    EmbeddingCompletionRequest,
    EmbeddingData,
    EmbeddingResponse,
    PoolingChatRequest,
    PoolingCompletionRequest,
    PoolingData,
    PoolingResponse,
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
    ScoreData,
    ScoreRequest,
    ScoreResponse,
)
from serving.api.protocol import UsageInfo
from serving.api.routes.chat import check_template_trust, render_prompt
from serving.api.routes.common import admitted, json_response, request_id_for, state_of
from serving.api.state import ServerState
from serving.engine.engine_client import EngineDeadError
from serving.engine.pooling_params import PoolingInput, PoolingOutput, PoolingParams

logger = logging.getLogger("xlaserve.api")
bp = Blueprint("pooling")

EMBEDDINGS_API = "Embeddings API"
POOLING_API = "Pooling API"
SCORE_API = "Score API"
RERANK_API = "Rerank (Score) API"
CLASSIFY_API = "Classification API"


# ---------------------------------------------------------------------------------- helpers


def _check_common(req: Any) -> None:
    if getattr(req, "priority", 0) != 0:
        raise BadRequest("priority scheduling is not enabled on this server; priority must be 0.",
                         param="priority")
    if getattr(req, "mm_processor_kwargs", None) is not None:
        raise BadRequest("mm_processor_kwargs is not supported (text-only models).",
                         param="mm_processor_kwargs")


def _param_of(message: str) -> str | None:
    for name in ("dimensions", "truncate_prompt_tokens", "normalize", "activation"):
        if name in message.lower():
            return name
    return None


async def _encode(engine: PoolingEngineClient, state: ServerState, inputs: list[PoolingInput],
                  params: PoolingParams) -> list[PoolingOutput]:
    """The engine call, with its refusals as API errors: ValueError 400, a dead engine 503."""
    try:
        return await engine.encode(inputs, params)
    except ValueError as e:
        raise BadRequest(str(e), param=_param_of(str(e))) from None
    except EngineDeadError as e:
        raise ServiceUnavailable("The engine has stopped; the server cannot serve this "
                                 "request.") from e


async def _tokenize(state: ServerState, engine: PoolingEngineClient, texts: list[str], *,
                    add_special_tokens: bool, truncate: int | None) -> list[PoolingInput]:
    if engine.tokenizer is None:
        raise BadRequest("This model has no tokenizer: send token ids.", param="input")
    try:
        return await state.off_loop(engine.tokenize, texts, add_special_tokens=add_special_tokens,
                                    truncate_prompt_tokens=truncate)
    except ValueError as e:
        raise BadRequest(str(e), param="truncate_prompt_tokens") from None


async def _completion_inputs(state: ServerState, engine: PoolingEngineClient,
                             req: EmbeddingCompletionRequest) -> list[PoolingInput]:
    """``input`` in any of its four forms -> the sequences to pool."""
    raw = req.input
    if raw == [] or raw == [[]]:
        raise BadRequest("input must not be empty.", param="input")
    if isinstance(raw, str):
        return await _tokenize(state, engine, [raw], add_special_tokens=req.add_special_tokens,
                               truncate=req.truncate_prompt_tokens)
    if len(raw) > MAX_POOLING_INPUTS:
        raise BadRequest(f"At most {MAX_POOLING_INPUTS} inputs per request, got {len(raw)}.",
                         param="input")
    if all(isinstance(x, int) for x in raw):
        return [PoolingInput([int(x) for x in raw])]  # type: ignore[arg-type]
    if all(isinstance(x, str) for x in raw):
        return await _tokenize(state, engine, list(raw),  # type: ignore[arg-type]
                               add_special_tokens=req.add_special_tokens,
                               truncate=req.truncate_prompt_tokens)
    return [PoolingInput(list(x)) for x in raw]  # type: ignore[arg-type]


async def _chat_inputs(state: ServerState, engine: PoolingEngineClient,
                       req: EmbeddingChatRequest) -> list[PoolingInput]:
    """Chat ``messages`` rendered through the chat template, as one input."""
    check_template_trust(state, req.chat_template, req.chat_template_kwargs)
    kwargs = dict(req.chat_template_kwargs or {})
    template = req.chat_template or kwargs.pop("chat_template", None)
    text = await render_prompt(state, req.messages,
                               add_generation_prompt=req.add_generation_prompt,
                               continue_final_message=req.continue_final_message,
                               documents=req.documents, template_kwargs=kwargs,
                               template=template)
    return await _tokenize(state, engine, [text], add_special_tokens=req.add_special_tokens,
                           truncate=req.truncate_prompt_tokens)


def _vector(data: np.ndarray, encoding: str) -> list[float] | list[list[float]] | str:
    if encoding == "base64":
        return base64.b64encode(np.ascontiguousarray(data, dtype="<f4").tobytes()).decode()
    out: list[float] | list[list[float]] = data.astype(np.float32).tolist()
    return out


def _usage(outs: list[PoolingOutput]) -> UsageInfo:
    n = sum(o.num_prompt_tokens for o in outs)
    return UsageInfo(prompt_tokens=n, total_tokens=n, completion_tokens=0)


def _parse(request: Request, completion: type[Any], chat: type[Any]) -> Any:
    body = parse_json_object(request)
    if "messages" in body:
        return validate_model(chat, body)
    if "input" in body:
        return validate_model(completion, body)
    raise BadRequest("Either `input` or `messages` must be given.", param="input")


# ---------------------------------------------------------------------------------- routes


@bp.post("/v1/embeddings")
@admitted
async def create_embeddings(request: Request) -> HTTPResponse:
    state = state_of(request)
    req = _parse(request, EmbeddingCompletionRequest, EmbeddingChatRequest)
    model = state.resolve_model(req.model)
    engine = state.require_pooling(EMBEDDINGS_API, "embed")
    _check_common(req)
    params = PoolingParams(
        task="embed", normalize=req.normalize, dimensions=req.dimensions,
        truncate_prompt_tokens=req.truncate_prompt_tokens)
    if isinstance(req, EmbeddingChatRequest):
        inputs = await _chat_inputs(state, engine, req)
    else:
        inputs = await _completion_inputs(state, engine, req)
    outs = await _encode(engine, state, inputs, params)
    data = [EmbeddingData(index=i, embedding=_vector(o.data, req.encoding_format))  # type: ignore[arg-type]
            for i, o in enumerate(outs)]
    rid = request_id_for(request, req.request_id)
    return json_response(EmbeddingResponse(id=f"embd-{rid}", model=model, data=data,
                                           usage=_usage(outs)))


@bp.post("/pooling")
@admitted
async def create_pooling(request: Request) -> HTTPResponse:
    state = state_of(request)
    req = _parse(request, PoolingCompletionRequest, PoolingChatRequest)
    model = state.resolve_model(req.model)
    engine = state.require_pooling(POOLING_API, "encode", "classify")
    _check_common(req)
    if "encode" in engine.supported_tasks:
        params = PoolingParams(task="encode", normalize=req.normalize,
                               dimensions=req.dimensions, activation=req.activation,
                               truncate_prompt_tokens=req.truncate_prompt_tokens)
    else:
        params = PoolingParams(task="classify", normalize=req.normalize,
                               dimensions=req.dimensions, activation=req.activation,
                               truncate_prompt_tokens=req.truncate_prompt_tokens)
    if isinstance(req, PoolingChatRequest):
        inputs = await _chat_inputs(state, engine, req)
    else:
        inputs = await _completion_inputs(state, engine, req)
    outs = await _encode(engine, state, inputs, params)
    data = [PoolingData(index=i, data=_vector(o.data, req.encoding_format))
            for i, o in enumerate(outs)]
    rid = request_id_for(request, req.request_id)
    return json_response(PoolingResponse(id=f"pool-{rid}", model=model, data=data,
                                         usage=_usage(outs)))


def _pairs(text_1: str | list[str], text_2: str | list[str]) -> tuple[list[str], list[str]]:
    """vLLM's pairing: 1:1, 1:N (text_1 repeated) or N:N (zipped)."""
    t1 = [text_1] if isinstance(text_1, str) else list(text_1)
    t2 = [text_2] if isinstance(text_2, str) else list(text_2)
    if not t1:
        raise BadRequest("At least one text element must be given.", param="text_1")
    if not t2:
        raise BadRequest("At least one text_pair element must be given.", param="text_2")
    if len(t1) > MAX_SCORE_TEXTS or len(t2) > MAX_SCORE_TEXTS:
        raise BadRequest(f"At most {MAX_SCORE_TEXTS} texts per side.", param="text_2")
    if len(t1) == 1:
        t1 = t1 * len(t2)
    elif len(t1) != len(t2):
        raise BadRequest("Input lengths must be either 1:1, 1:N or N:N.", param="text_1")
    return t1, t2


async def _score_pairs(state: ServerState, engine: PoolingEngineClient, t1: list[str],
                       t2: list[str], truncate: int | None,
                       activation: bool | None) -> tuple[list[float], int]:
    """One score per (t1[i], t2[i]) pair, and the tokens pooled for them."""
    if "score" in engine.supported_tasks:  # a cross-encoder
        if engine.info.num_labels != 1:
            raise BadRequest(f"Scores need a single-label cross-encoder; this model has "
                             f"{engine.info.num_labels} labels (use /classify).")
        params = PoolingParams(task="score", activation=activation,
                                                  truncate_prompt_tokens=truncate)
        if engine.tokenizer is None:
            raise BadRequest("This model has no tokenizer.")
        try:
            inputs = await state.off_loop(engine.tokenize_pairs, t1, t2,
                                          truncate_prompt_tokens=truncate)
        except ValueError as e:
            raise BadRequest(str(e), param="truncate_prompt_tokens") from None
        outs = await _encode(engine, state, inputs, params)
        return [float(o.data[0]) for o in outs], sum(o.num_prompt_tokens for o in outs)
    # An embedding model: the cosine similarity of the two embeddings.
    if activation is not None:
        raise BadRequest("activation applies to cross-encoders only.", param="activation")
    params = PoolingParams(task="embed", normalize=True,
                                              truncate_prompt_tokens=truncate)
    inputs = await _tokenize(state, engine, t1 + t2, add_special_tokens=True, truncate=truncate)
    outs = await _encode(engine, state, inputs, params)
    n = len(t1)
    scores = []
    for a, b in zip(outs[:n], outs[n:], strict=True):
        denom = float(np.linalg.norm(a.data) * np.linalg.norm(b.data))
        scores.append(float(a.data @ b.data) / denom if denom > 0 else 0.0)
    return scores, sum(o.num_prompt_tokens for o in outs)


@bp.post("/score")
@admitted
async def create_score(request: Request) -> HTTPResponse:
    return await _score(request)


@bp.post("/v1/score")
@admitted
async def create_score_v1(request: Request) -> HTTPResponse:
    return await _score(request)


async def _score(request: Request) -> HTTPResponse:
    state = state_of(request)
    req = validate_model(ScoreRequest, parse_json_object(request))
    model = state.resolve_model(req.model)
    engine = state.require_pooling(SCORE_API, "score", "embed")
    _check_common(req)
    t1, t2 = _pairs(req.text_1, req.text_2)
    scores, tokens = await _score_pairs(state, engine, t1, t2, req.truncate_prompt_tokens,
                                        req.activation)
    rid = request_id_for(request, req.request_id)
    return json_response(ScoreResponse(
        id=f"score-{rid}", model=model,
        data=[ScoreData(index=i, score=s) for i, s in enumerate(scores)],
        usage=UsageInfo(prompt_tokens=tokens, total_tokens=tokens, completion_tokens=0)))


@bp.post("/rerank")
@admitted
async def rerank(request: Request) -> HTTPResponse:
    return await _rerank(request)


@bp.post("/v1/rerank")
@admitted
async def rerank_v1(request: Request) -> HTTPResponse:
    return await _rerank(request)


@bp.post("/v2/rerank")
@admitted
async def rerank_v2(request: Request) -> HTTPResponse:
    return await _rerank(request)


async def _rerank(request: Request) -> HTTPResponse:
    state = state_of(request)
    req = validate_model(RerankRequest, parse_json_object(request))
    model = state.resolve_model(req.model)
    engine = state.require_pooling(RERANK_API, "score", "embed")
    _check_common(req)
    if not req.documents:
        raise BadRequest("At least one document must be given.", param="documents")
    t1, t2 = _pairs(req.query, req.documents)
    scores, tokens = await _score_pairs(state, engine, t1, t2, req.truncate_prompt_tokens,
                                        req.activation)
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
    if req.top_n > 0:
        order = order[: req.top_n]
    results = [RerankResult(index=i, document=RerankDocument(text=req.documents[i]),
                            relevance_score=scores[i]) for i in order]
    rid = request_id_for(request, req.request_id)
    return json_response(RerankResponse(id=f"rerank-{rid}", model=model,
                                        usage=RerankUsage(total_tokens=tokens),
                                        results=results))


@bp.post("/classify")
@admitted
async def classify(request: Request) -> HTTPResponse:
    state = state_of(request)
    req = validate_model(ClassificationRequest, parse_json_object(request))
    model = state.resolve_model(req.model)
    engine = state.require_pooling(CLASSIFY_API, "classify")
    _check_common(req)
    texts = [req.input] if isinstance(req.input, str) else list(req.input)
    rid = request_id_for(request, req.request_id)
    if not texts:
        return json_response(ClassificationResponse(id=f"classify-{rid}", model=model, data=[],
                                                    usage=UsageInfo()))
    if any(t == "" for t in texts):
        raise BadRequest("input must not contain empty strings.", param="input")
    params = PoolingParams(task="classify", activation=req.activation,
                                              truncate_prompt_tokens=req.truncate_prompt_tokens)
    inputs = await _tokenize(state, engine, texts, add_special_tokens=req.add_special_tokens,
                             truncate=req.truncate_prompt_tokens)
    outs = await _encode(engine, state, inputs, params)
    labels = engine.labels
    data = []
    for i, o in enumerate(outs):
        probs = o.data.astype(np.float32)
        best = int(np.argmax(probs))
        data.append(ClassificationData(index=i, label=labels[best] if labels else None,
                                       probs=probs.tolist(), num_classes=len(probs)))
    return json_response(ClassificationResponse(id=f"classify-{rid}", model=model, data=data,
                                                usage=_usage(outs)))
