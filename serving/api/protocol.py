"""OpenAI-compatible request and response schemas (pydantic), with vLLM's extra fields.

Requests are validated in strict mode (``"10"`` is not an int, ``true`` is not a number,
``NaN``/``Infinity`` are refused) and unknown top-level fields are allowed but logged, as vLLM
does. Fields this server does not implement yet are declared so that they can be refused with a
clear 400 (``UNSUPPORTED_*`` below) instead of being dropped silently. Range checks of sampling
fields live in ``SamplingParams.validate`` (one source of truth shared with the offline API); the
bounds here are the ones a schema can state without knowing the server's configuration.

No engine imports: the HTTP layer builds ``SamplingParams`` from these models in
``serving.api.generation``.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Bounds that protect the server before any work is done (see reliability notes: every list and
# number from a client gets an upper bound).
MAX_STOP_SEQUENCES = 16
MAX_STOP_STRING_CHARS = 1000
MAX_MESSAGES = 4096
MAX_PROMPTS = 256
MAX_CACHE_SALT_CHARS = 256

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class StrictModel(BaseModel):
    """Responses: fixed fields, no extras."""

    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------


class StreamOptions(OpenAIBaseModel):
    # OpenAI's default (and vLLM's after PR #36379): no usage unless asked for.
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class ResponseFormat(OpenAIBaseModel):
    type: str
    json_schema: dict[str, Any] | None = None


class SamplingFields(OpenAIBaseModel):
    """Fields both generation APIs share: OpenAI's sampling fields and vLLM's extras."""

    model: str | None = None
    n: int = Field(1, ge=1)
    best_of: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    repetition_penalty: float | None = None
    length_penalty: float = 1.0
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    logit_bias: dict[str, float] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    prompt_logprobs: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    echo: bool = False
    request_id: str | None = Field(None, max_length=256)
    priority: int = 0
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    response_format: ResponseFormat | None = None
    service_tier: str | None = None
    # Salts the prefix-cache hashes (vLLM): requests with different salts never share cached
    # pages. A non-empty string; checked in ``serving.api.generation.check_common``.
    cache_salt: str | None = Field(None, max_length=MAX_CACHE_SALT_CHARS)
    # Structured outputs (serving.api.structured reads and checks them).
    structured_outputs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_decoding_backend: Any = None
    guided_whitespace_pattern: Any = None
    # Declared so that they can be refused with a clear 400 (see UNSUPPORTED_SAMPLING).
    use_beam_search: bool = False
    allowed_token_ids: Any = None
    bad_words: Any = None
    structural_tag: Any = None
    logits_processors: Any = None
    kv_transfer_params: Any = None
    vllm_xargs: Any = None
    mm_processor_kwargs: Any = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] | None = None
    max_tokens: int | None = 16
    logprobs: int | None = None
    suffix: Any = None
    add_special_tokens: bool = True
    prompt_embeds: Any = None


class ContentPart(OpenAIBaseModel):
    type: str | None = None
    text: str | None = None


class ChatMessage(OpenAIBaseModel):
    role: str = Field(min_length=1, max_length=64)
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    documents: list[dict[str, str]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None  # a chat template input
    include_reasoning: bool = True  # false drops reasoning_content (needs --reasoning-parser)
    # Accepted and ignored, as vLLM 0.11 does: a named choice makes one call, and required /
    # auto calls are as many as the model writes.
    parallel_tool_calls: bool | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    store: bool | None = None
    metadata: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None


class TokenizeCompletionRequest(OpenAIBaseModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(OpenAIBaseModel):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool = False
    documents: list[dict[str, str]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: Any = None
    mm_processor_kwargs: Any = None


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[int]


# Field → why it is refused. A request carrying any of these with a non-default value gets a 400
# that names the field, instead of being answered as if the field were absent.
UNSUPPORTED_SAMPLING: dict[str, str] = {
    "use_beam_search": "beam search is not supported",
    "allowed_token_ids": "allowed_token_ids is not supported",
    "bad_words": "bad_words is not supported",
    "structural_tag": "a top-level structural_tag is not supported; send it as response_format "
                      "{type: structural_tag, ...} or structured_outputs.structural_tag",
    "logits_processors": "per-request logits_processors are not supported",
    "kv_transfer_params": "kv_transfer_params is not supported",
    "vllm_xargs": "vllm_xargs is not supported",
    "mm_processor_kwargs": "mm_processor_kwargs is not supported (text-only models)",
}
UNSUPPORTED_COMPLETION: dict[str, str] = {
    "suffix": "suffix is not currently supported",
    "prompt_embeds": "prompt_embeds is not supported",
}
UNSUPPORTED_CHAT: dict[str, str] = {
    "functions": "functions (deprecated by OpenAI) is not supported; use tools",
    "function_call": "function_call (deprecated by OpenAI) is not supported; use tool_choice",
    "audio": "audio output is not supported",
    "prediction": "prediction (predicted outputs) is not supported",
    "web_search_options": "web_search_options is not supported",
    "metadata": "metadata is not supported (this server stores nothing)",
}


# --------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------


def _now() -> int:
    return int(time.time())


class PromptTokensDetails(StrictModel):
    cached_tokens: int = 0


class UsageInfo(StrictModel):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int | None = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class PromptLogprobEntry(StrictModel):
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobs = list[dict[str, PromptLogprobEntry] | None]


class CompletionLogprobs(StrictModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(StrictModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None


class CompletionResponse(StrictModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None
    system_fingerprint: str | None = None
    service_tier: str | None = None


class CompletionStreamChoice(StrictModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None


class CompletionStreamResponse(StrictModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionStreamChoice]
    usage: UsageInfo | None = None


class ChatTopLogprob(StrictModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(StrictModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(StrictModel):
    content: list[ChatLogprobToken] | None = None
    refusal: list[ChatLogprobToken] | None = None


class ChatMessageOut(StrictModel):
    role: str
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)
    reasoning_content: str | None = None


class ChatChoice(StrictModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(StrictModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None
    system_fingerprint: str | None = None
    service_tier: str | None = None


class DeltaMessage(StrictModel):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatStreamChoice(StrictModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionStreamResponse(StrictModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None


class ModelPermission(StrictModel):
    id: str
    object: Literal["model_permission"] = "model_permission"
    created: int = Field(default_factory=_now)
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(StrictModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "xlaserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[ModelPermission] = Field(default_factory=list)


class ModelList(StrictModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(StrictModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(StrictModel):
    prompt: str
