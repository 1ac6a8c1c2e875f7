"""Request and response schemas of the pooling APIs: embeddings, pooling, score, rerank, classify.

Shapes follow vLLM v0.11 (``../shared/reference/vllm_openai_server.md`` §2.3 and §3.6). Requests
share the strict base of ``serving.api.protocol`` (no coercion, unknown fields logged); fields a
text-only BERT server cannot honour (``mm_processor_kwargs``) are declared so that the route can
refuse them with a 400 naming the field. No engine imports: the routes build ``PoolingParams``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from serving.api.protocol import (
    MAX_MESSAGES,
    ChatMessage,
    OpenAIBaseModel,
    StrictModel,
    UsageInfo,
    _now,
)

# Upper bounds on list inputs (OpenAI's embeddings API takes at most 2048 inputs per request).
MAX_POOLING_INPUTS = 2048
MAX_SCORE_TEXTS = 1024

EncodingFormat = Literal["float", "base64"]


class _PoolingFields(OpenAIBaseModel):
    model: str | None = None
    encoding_format: EncodingFormat = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    priority: int = 0
    request_id: str | None = Field(None, max_length=256)
    normalize: bool | None = None
    mm_processor_kwargs: Any = None


class EmbeddingCompletionRequest(_PoolingFields):
    input: str | list[str] | list[int] | list[list[int]]
    add_special_tokens: bool = True


class EmbeddingChatRequest(_PoolingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    add_generation_prompt: bool = False  # an embedding embeds the conversation as it is
    continue_final_message: bool = False
    add_special_tokens: bool = False
    documents: list[dict[str, str]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class PoolingCompletionRequest(EmbeddingCompletionRequest):
    activation: bool | None = None  # classifier models: apply sigmoid/softmax (default true)


class PoolingChatRequest(EmbeddingChatRequest):
    activation: bool | None = None


class ScoreRequest(OpenAIBaseModel):
    model: str | None = None
    text_1: str | list[str]
    text_2: str | list[str]
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    priority: int = 0
    request_id: str | None = Field(None, max_length=256)
    activation: bool | None = None
    user: str | None = None
    mm_processor_kwargs: Any = None


class RerankRequest(OpenAIBaseModel):
    model: str | None = None
    query: str
    documents: list[str] = Field(max_length=MAX_SCORE_TEXTS)
    top_n: int = Field(0, ge=0)  # 0: all documents
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    priority: int = 0
    request_id: str | None = Field(None, max_length=256)
    activation: bool | None = None
    user: str | None = None
    mm_processor_kwargs: Any = None


class ClassificationRequest(OpenAIBaseModel):
    model: str | None = None
    input: str | list[str] = Field(max_length=MAX_POOLING_INPUTS)
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    priority: int = 0
    request_id: str | None = Field(None, max_length=256)
    activation: bool | None = None
    user: str | None = None
    add_special_tokens: bool = True


# ---------------------------------------------------------------------------------- responses


class EmbeddingData(StrictModel):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str


class EmbeddingResponse(StrictModel):
    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=_now)
    model: str
    data: list[EmbeddingData]
    usage: UsageInfo


class PoolingData(StrictModel):
    index: int
    object: Literal["pooling"] = "pooling"
    data: list[list[float]] | list[float] | str


class PoolingResponse(StrictModel):
    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=_now)
    model: str
    data: list[PoolingData]
    usage: UsageInfo


class ScoreData(StrictModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(StrictModel):
    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=_now)
    model: str
    data: list[ScoreData]
    usage: UsageInfo


class RerankDocument(StrictModel):
    text: str


class RerankResult(StrictModel):
    index: int
    document: RerankDocument
    relevance_score: float


class RerankUsage(StrictModel):
    total_tokens: int


class RerankResponse(StrictModel):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]


class ClassificationData(StrictModel):
    index: int
    label: str | None
    probs: list[float]
    num_classes: int


class ClassificationResponse(StrictModel):
    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=_now)
    model: str
    data: list[ClassificationData]
    usage: UsageInfo
