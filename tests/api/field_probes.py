"""Every field of every request model, and the probe that shows the server does not drop it.

A *probe* sends a route's base request with one field set to a valid, non-default value, and the
same request without that field (both with the probe's ``context``, the other fields the field
needs to matter, e.g. ``stream: true`` for ``stream_options.include_usage``). The field passes
when either

- the answer is a deliberate refusal (400/404) that names the field: ``param`` is the field's
  path, or an enclosing path and the message names the field; a schema error ("Invalid
  request: ...") does not count, since it would only show that the probe value was wrong; or
- the answer is 200 and the response, or what reached the engine (the fake engine's record of
  prompt ids, ``SamplingParams`` and keyword arguments), differs from the request without it.

Fields are enumerated from ``model_fields``, recursing into nested models (``messages.0.*``,
``messages.0.content.0.*``, ``stream_options.*``, ``response_format.*``), so a field added to a
request model without a probe fails, and a probe for a field that changes nothing fails. The
only exception is ``IGNORED``: fields that change nothing by specification; their probe must be
accepted and change nothing (so an entry there cannot outlive the field becoming meaningful).

The tables here cover every request model of ``serving.api.protocol`` and
``serving.api.pooling_protocol``; ``test_request_fields.py`` (generation, tokenize; the fake
engine) and ``tests/pooling/test_pooling_http.py`` (pooling; real MiniLM and cross-encoder
servers) run them.
"""

from __future__ import annotations

import copy
import json
import re
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel

from serving.api.pooling_protocol import (
    ClassificationRequest,
    EmbeddingChatRequest,
    EmbeddingCompletionRequest,
    PoolingChatRequest,
    PoolingCompletionRequest,
    RerankRequest,
    ScoreRequest,
)
from serving.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)

# Fields that by specification change nothing this server could show, with the reason. Each is
# documented as "accepted and ignored" in docs/SERVER.md.
IGNORED: dict[str, str] = {
    # OpenAI: "a unique identifier representing your end-user, which can help OpenAI to monitor
    # and detect abuse"; vLLM ignores it too.
    "user": "an end-user id for the provider's abuse monitoring; changes no output",
    # vLLM 0.11 ignores it too: a named choice makes one call, required / auto as many as the
    # model writes.
    "parallel_tool_calls": "accepted and ignored, as vLLM 0.11 does",
}

# A chat template that reads every input the server hands to templates, so that a dropped
# message field or template variable shows in the rendered prompt. It renders content as a
# string (list content is joined), which is the format ``detect_content_format`` picks for it.
FIELDS_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "<{{ m['role'] }}{% if m.name %} name={{ m.name }}{% endif %}"
    "{% if m.tool_call_id %} call_id={{ m.tool_call_id }}{% endif %}>"
    "{% if m.reasoning_content %}[reasoning {{ m.reasoning_content }}]{% endif %}"
    "{{ m['content'] }}"
    "{% for c in m.tool_calls or [] %}[call {{ c.function.name }} "
    "{{ c.function.arguments | tojson }}]{% endfor %}</{{ m['role'] }}>"
    "{% endfor %}"
    "{% for d in documents or [] %}[doc {{ d.title }}: {{ d.text }}]{% endfor %}"
    "{% if reasoning_effort %}[effort {{ reasoning_effort }}]{% endif %}"
    "{% if enable_thinking %}[thinking]{% endif %}"
    "{% for t in tools or [] %}[tool {{ t.function.name }}]{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@dataclass(frozen=True)
class Probe:
    """``value`` for the field; ``context``: (dotted) paths set on both requests."""

    value: Any
    context: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Route:
    """One request model as one route serves it."""

    name: str
    path: str
    model: type[BaseModel]
    base: Mapping[str, Any]
    probes: Mapping[str, Probe]


# ------------------------------------------------------------------------- field enumeration


def _nested(annotation: Any) -> list[tuple[str, type[BaseModel]]]:
    """(path suffix, model) of every request model inside an annotation (``.0`` for list items)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [("", annotation)]
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is list:
        return [(".0" + suffix, model) for suffix, model in _nested(args[0])]
    if origin in (typing.Union, types.UnionType):
        return [pair for arg in args for pair in _nested(arg)]
    return []


def _has_plain_value(annotation: Any) -> bool:
    """Whether the field takes values other than nested models and null (then it is a leaf)."""
    if annotation is type(None):
        return False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_has_plain_value(a) for a in typing.get_args(annotation))
    return not _nested(annotation)


def field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted paths of every leaf field of ``model``, nested models included."""
    out: list[str] = []
    for name, info in model.model_fields.items():
        path = prefix + name
        if _has_plain_value(info.annotation):
            out.append(path)
        for suffix, sub in _nested(info.annotation):
            out.extend(field_paths(sub, f"{path}{suffix}."))
    return out


def nested_models(model: type[BaseModel]) -> set[type[BaseModel]]:
    """``model`` and every model reachable from its fields."""
    seen = {model}
    for info in model.model_fields.values():
        for _, sub in _nested(info.annotation):
            if sub not in seen:
                seen |= nested_models(sub)
    return seen


def with_path(body: Mapping[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``body`` with ``path`` (dots; integers index lists) set to ``value``."""
    out = copy.deepcopy(dict(body))
    *parents, leaf = path.split(".")
    node: Any = out
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(leaf)] = value
    else:
        node[leaf] = value
    return out


# ------------------------------------------------------------------------- running a probe


class Recorder:
    """Reads what reached the fake engine (``XLASERVE_FAKE_RECORD``) since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def take(self) -> list[Any]:
        if not self.path.exists():
            return []
        with self.path.open() as f:
            f.seek(self.offset)
            text = f.read()
            self.offset = f.tell()
        return [json.loads(line) for line in text.splitlines() if line]


@dataclass
class Outcome:
    status: int
    body: Any
    records: list[Any]


def _normalize(value: Any, request_id: str | None) -> Any:
    """Drop what differs between two identical requests: ``created``, and random ids (kept only
    when they carry the request's own ``request_id``)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k == "created":
                continue
            if k in ("id", "request_id") and isinstance(v, str):
                v = v if request_id and request_id in v else "<random>"
            out[k] = _normalize(v, request_id)
        return out
    if isinstance(value, list):
        return [_normalize(v, request_id) for v in value]
    return value


def _sse(response: httpx.Response) -> list[Any]:
    return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
            for line in response.iter_lines() if line]


def send(client: httpx.Client, path: str, body: Mapping[str, Any],
         recorder: Recorder | None) -> Outcome:
    if recorder is not None:
        recorder.take()  # skip anything left from earlier requests
    with client.stream("POST", path, json=dict(body)) as r:
        r.read()
        data = (_sse(r) if r.headers.get("content-type", "").startswith("text/event-stream")
                else r.json())
    rid = body.get("request_id") if isinstance(body.get("request_id"), str) else None
    records = recorder.take() if recorder is not None else []
    return Outcome(r.status_code, _normalize(data, rid), _normalize(records, rid))


def names_field(error: Mapping[str, Any], path: str) -> bool:
    """Whether an error names ``path``: as its ``param``, or as an enclosing ``param`` whose
    message names the field itself."""
    param = error.get("param") or ""
    leaf = path.rsplit(".", 1)[-1]
    if param == path:
        return True
    return bool(param) and path.startswith(param + ".") and re.search(
        rf"\b{re.escape(leaf)}\b", error.get("message", "")) is not None


def check_field(client: httpx.Client, route: Route, path: str,
                recorder: Recorder | None = None) -> str:
    """Run ``route``'s probe for ``path``; returns how the field is handled ("refused",
    "used", "ignored") or raises AssertionError saying why the field looks silently dropped."""
    leaf = path.rsplit(".", 1)[-1]
    probe = route.probes.get(path)
    assert probe is not None, (
        f"{route.name}: no probe for field {path!r}. Implement the field (and add a probe whose "
        "value changes the response or what reaches the engine) or refuse it with a 400 "
        "naming it; see tests/api/field_probes.py.")
    base = dict(route.base)
    for ctx_path, ctx_value in probe.context.items():
        base = with_path(base, ctx_path, ctx_value)
    without = send(client, route.path, base, recorder)
    assert without.status == 200, (
        f"{route.name}: the request without {path!r} failed, so the probe proves nothing: "
        f"{without.body}")
    got = send(client, route.path, with_path(base, path, probe.value), recorder)
    if leaf in IGNORED:
        assert got.status == 200 and (got.body, got.records) == (without.body, without.records), (
            f"{route.name}: {path!r} is listed as accepted and ignored, but the probe "
            f"{probe.value!r} changed the answer: take it off IGNORED and give it a probe. "
            f"{got.body}")
        return "ignored"
    if got.status in (400, 404):
        error = got.body["error"]
        assert not error["message"].startswith("Invalid request:"), (
            f"{route.name}: the probe value {probe.value!r} for {path!r} does not validate; "
            f"pick a valid one: {error}")
        assert names_field(error, path), (
            f"{route.name}: {path!r} got a {got.status} that does not name it: {error}")
        return "refused"
    assert got.status == 200, f"{route.name}: {path!r}: unexpected {got.status}: {got.body}"
    assert (got.body, got.records) != (without.body, without.records), (
        f"{route.name}: {path!r} = {probe.value!r} was accepted, but neither the response nor "
        "what reached the engine changed: the field is silently ignored. Implement it or "
        "refuse it with a 400 that names it.")
    return "used"


def cases(routes: list[Route]) -> Iterator[tuple[Route, str]]:
    """Every (route, field path) pair to check."""
    for route in routes:
        for path in field_paths(route.model):
            yield route, path


def stale_probes(routes: list[Route]) -> list[str]:
    """Probes for fields that no longer exist."""
    return [f"{r.name}: {p}" for r in routes for p in r.probes
            if p not in field_paths(r.model)]


def case_id(case: tuple[Route, str]) -> str:
    return f"{case[0].name}:{case[1]}"


# ------------------------------------------------------------------------- generation probes

HELLO = [{"role": "user", "content": "Hello there"}]
PARTS = [{"type": "text", "text": "Hello there"}]
CONTINUE = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "The"}]

COMPLETION_BASE = {"prompt": "Hello there", "max_tokens": 4}
CHAT_BASE = {"messages": HELLO, "max_tokens": 4}

REFUSED_SAMPLING = {
    "best_of": Probe(2),
    "length_penalty": Probe(0.5),
    "priority": Probe(1),
    "service_tier": Probe("flex"),
    "response_format.json_schema": Probe({"type": "object"}, {"response_format": {"type": "text"}}),
    "use_beam_search": Probe(True),
    "allowed_token_ids": Probe([5]),
    "bad_words": Probe(["Paris"]),
    "guided_decoding_backend": Probe("xgrammar"),  # only the server's own backend
    "structural_tag": Probe("{}"),
    "logits_processors": Probe(["pkg.module:processor"]),
    "kv_transfer_params": Probe({"do_remote_prefill": True}),
    "vllm_xargs": Probe({"key": 1}),
    "mm_processor_kwargs": Probe({"key": 1}),
}

# Structured outputs: the constraint reaches the engine (``SamplingParams.structured``).
STRUCTURED = {
    "response_format.type": Probe("json_object"),
    "structured_outputs": Probe({"choice": ["a", "b"]}),
    "guided_json": Probe({"type": "object"}),
    "guided_regex": Probe("[a-z]+"),
    "guided_choice": Probe(["a", "b"]),
    "guided_grammar": Probe('root ::= "a"'),
    "guided_whitespace_pattern": Probe("[ ]?", {"guided_json": {"type": "object"}}),
}

SAMPLING = {
    **REFUSED_SAMPLING,
    **STRUCTURED,
    "model": Probe("no-such-model"),
    "n": Probe(2),
    "temperature": Probe(0.5),
    "top_p": Probe(0.5),
    "top_k": Probe(5),
    "min_p": Probe(0.1),
    "presence_penalty": Probe(0.5),
    "frequency_penalty": Probe(0.5),
    "repetition_penalty": Probe(1.2),
    "seed": Probe(7),
    "stop": Probe(["capital"]),
    "stop_token_ids": Probe([5]),
    "include_stop_str_in_output": Probe(True, {"stop": ["capital"]}),
    "ignore_eos": Probe(True),
    "min_tokens": Probe(2),
    "logit_bias": Probe({"5": 1.0}),
    "skip_special_tokens": Probe(False),
    "spaces_between_special_tokens": Probe(False),
    "truncate_prompt_tokens": Probe(1),
    "prompt_logprobs": Probe(1),
    "stream": Probe(True),
    "stream_options.include_usage": Probe(True, {"stream": True}),
    "stream_options.continuous_usage_stats": Probe(
        True, {"stream": True, "stream_options": {"include_usage": True}}),
    "user": Probe("user-7"),
    "request_id": Probe("probe-id"),
    "return_token_ids": Probe(True),
    "cache_salt": Probe("tenant-a"),
}

MESSAGE = {
    "messages.0.role": Probe("system"),
    "messages.0.content": Probe("Bonjour"),
    "messages.0.content.0.type": Probe("image_url", {"messages.0.content": PARTS}),
    "messages.0.content.0.text": Probe("Bonjour", {"messages.0.content": PARTS}),
    "messages.0.name": Probe("ana"),
    "messages.0.tool_calls": Probe(
        [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]),
    "messages.0.tool_call_id": Probe("c1"),
    "messages.0.reasoning_content": Probe("hmm"),
    "messages.0.reasoning": Probe("hmm"),
}

TEMPLATE_INPUTS = {
    "add_generation_prompt": Probe(False),
    "continue_final_message": Probe(True, {"add_generation_prompt": False}),
    "add_special_tokens": Probe(True),  # Gemma's <bos> on top of the template's own
    "documents": Probe([{"title": "T", "text": "D"}]),
    "chat_template": Probe("{{ messages[0]['content'] }}"),
    "chat_template_kwargs": Probe({"enable_thinking": True}),
}

COMPLETIONS = Route("completions", "/v1/completions", CompletionRequest, COMPLETION_BASE, {
    **SAMPLING,
    "echo": Probe(True),
    "return_tokens_as_token_ids": Probe(True, {"logprobs": 1}),
    "prompt": Probe("Bonjour"),
    "max_tokens": Probe(2),
    "logprobs": Probe(1),
    "suffix": Probe("!"),
    "add_special_tokens": Probe(False),  # Gemma's tokenizer adds <bos>
    "prompt_embeds": Probe("AAAA"),
})

CHAT = Route("chat", "/v1/chat/completions", ChatCompletionRequest, CHAT_BASE, {
    **SAMPLING,
    **MESSAGE,
    **TEMPLATE_INPUTS,
    # Echo applies when the final message has the response role (continuing it).
    "echo": Probe(True, {"messages": CONTINUE, "add_generation_prompt": False,
                         "continue_final_message": True}),
    "return_tokens_as_token_ids": Probe(True, {"logprobs": True}),
    "max_tokens": Probe(2),
    "max_completion_tokens": Probe(2),
    "logprobs": Probe(True),
    "top_logprobs": Probe(2, {"logprobs": True}),
    "reasoning_effort": Probe("low"),
    "include_reasoning": Probe(False),
    "parallel_tool_calls": Probe(False),
    "tools": Probe([{"type": "function", "function": {"name": "f"}}], {"tool_choice": "none"}),
    "tool_choice": Probe("required", {"tools": [{"type": "function", "function": {"name": "f"}}],
                                      "tool_choice": "none"}),
    "functions": Probe([{"name": "f"}]),
    "function_call": Probe("auto"),
    "store": Probe(True),
    "metadata": Probe({"key": "value"}),
    "modalities": Probe(["text", "audio"]),
    "audio": Probe({"voice": "alloy", "format": "wav"}),
    "prediction": Probe({"type": "content", "content": "x"}),
    "web_search_options": Probe({"search_context_size": "low"}),
})

TOKENIZE = Route("tokenize", "/tokenize", TokenizeCompletionRequest, {"prompt": "Hello there"}, {
    "model": Probe("no-such-model"),
    "prompt": Probe("Bonjour"),
    "add_special_tokens": Probe(False),
    "return_token_strs": Probe(True),
})

TOKENIZE_CHAT = Route("tokenize-chat", "/tokenize", TokenizeChatRequest, {"messages": HELLO}, {
    **MESSAGE,
    **TEMPLATE_INPUTS,
    "model": Probe("no-such-model"),
    "return_token_strs": Probe(True),
    "tools": Probe([{"type": "function", "function": {"name": "f"}}]),
    "mm_processor_kwargs": Probe({"key": 1}),
})

DETOKENIZE = Route("detokenize", "/detokenize", DetokenizeRequest, {"tokens": [9259]}, {
    "model": Probe("no-such-model"),
    "tokens": Probe([9259, 9259]),
})

GENERATION_ROUTES = [COMPLETIONS, CHAT, TOKENIZE, TOKENIZE_CHAT, DETOKENIZE]

# ------------------------------------------------------------------------- pooling probes

POOLING_COMMON = {
    "model": Probe("no-such-model"),
    "encoding_format": Probe("base64"),
    "dimensions": Probe(8),  # MiniLM is no Matryoshka model: refused
    "user": Probe("user-7"),
    "truncate_prompt_tokens": Probe(2),
    "priority": Probe(1),
    "request_id": Probe("probe-id"),
    "mm_processor_kwargs": Probe({"key": 1}),
}
POOLING_CHAT_INPUTS = {
    **MESSAGE,
    **TEMPLATE_INPUTS,
    "add_generation_prompt": Probe(True),  # false by default for embeddings
    "add_special_tokens": Probe(True),  # [CLS]/[SEP]
}
EMBED_NORMALIZE = {"normalize": Probe(False)}  # MiniLM normalizes by default
ENCODE_NORMALIZE = {"normalize": Probe(True), "activation": Probe(True)}

EMBED = Route("embeddings", "/v1/embeddings", EmbeddingCompletionRequest,
              {"input": "hello world"}, {
                  **POOLING_COMMON, **EMBED_NORMALIZE,
                  "input": Probe("good morning"),
                  "add_special_tokens": Probe(False),
              })
EMBED_CHAT = Route("embeddings-chat", "/v1/embeddings", EmbeddingChatRequest,
                   {"messages": HELLO},
                   {**POOLING_COMMON, **EMBED_NORMALIZE, **POOLING_CHAT_INPUTS})
POOL = Route("pooling", "/pooling", PoolingCompletionRequest, {"input": "hello world"}, {
    **POOLING_COMMON, **ENCODE_NORMALIZE,
    "input": Probe("good morning"),
    "add_special_tokens": Probe(False),
})
POOL_CHAT = Route("pooling-chat", "/pooling", PoolingChatRequest, {"messages": HELLO},
                  {**POOLING_COMMON, **ENCODE_NORMALIZE, **POOLING_CHAT_INPUTS})
PAIR_COMMON = {
    "model": Probe("no-such-model"),
    "truncate_prompt_tokens": Probe(2),
    "priority": Probe(1),
    "request_id": Probe("probe-id"),
    "activation": Probe(True),  # an embedding model scores by cosine: refused
    "user": Probe("user-7"),
    "mm_processor_kwargs": Probe({"key": 1}),
}
SCORE = Route("score", "/score", ScoreRequest,
              {"text_1": "A man is eating food.", "text_2": "A man eats bread."}, {
                  **PAIR_COMMON,
                  "text_1": Probe("The sky is blue."),
                  "text_2": Probe("Stock prices fell."),
              })
RERANK = Route("rerank", "/rerank", RerankRequest,
               {"query": "A man is eating food.", "documents": ["A man eats bread.", "Sky."]}, {
                   **PAIR_COMMON,
                   "query": Probe("The sky is blue."),
                   "documents": Probe(["Stock prices fell.", "Sky."]),
                   "top_n": Probe(1),
               })
# On the cross-encoder fixture (a single-label classifier).
CLASSIFY = Route("classify", "/classify", ClassificationRequest, {"input": "what is jax"}, {
    "model": Probe("no-such-model"),
    "input": Probe("berlin"),
    "truncate_prompt_tokens": Probe(2),
    "priority": Probe(1),
    "request_id": Probe("probe-id"),
    "activation": Probe(False),
    "user": Probe("user-7"),
    "add_special_tokens": Probe(False),
})

EMBEDDING_MODEL_ROUTES = [EMBED, EMBED_CHAT, POOL, POOL_CHAT, SCORE, RERANK]
CROSS_ENCODER_ROUTES = [CLASSIFY]
ALL_ROUTES = GENERATION_ROUTES + EMBEDDING_MODEL_ROUTES + CROSS_ENCODER_ROUTES
