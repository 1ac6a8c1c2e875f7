"""The error matrix over real HTTP (fake engine): every bad request gets its status and an
OpenAI-shaped body, is answered before any engine work, and the server keeps serving."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.api.conftest import good_request_still_works

C = "/v1/completions"
CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
OK_C = {"prompt": "Hello", "max_tokens": 3}
OK_CHAT = {"messages": MSG, "max_tokens": 3}


def check_error(r: httpx.Response, status: int, needle: str | None = None,
                param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status and isinstance(err["message"], str) and err["type"]
    assert "Traceback" not in err["message"]
    if needle is not None:
        assert needle in err["message"], err["message"]
    if param is not None:
        assert err["param"] == param, err
    return dict(err)


# (path, body changes, expected substring, param)
BAD_400: list[tuple[str, dict[str, Any], str, str | None]] = [
    (C, {"prompt": ""}, "must be provided and non-empty", "prompt"),
    (C, {"prompt": []}, "must be provided and non-empty", "prompt"),
    (C, {"prompt": ["ok", ""]}, "must be provided and non-empty", "prompt"),
    (C, {"prompt": None}, "must be provided and non-empty", "prompt"),
    (C, {"prompt": [999999]}, "out of vocabulary", "prompt"),
    (C, {"prompt": [-1]}, "out of vocabulary", "prompt"),
    (C, {"prompt": [[1, 2], []]}, "must be provided and non-empty", "prompt"),
    (C, {"prompt": 5}, "prompt", None),
    (C, {"logprobs": 21}, "greater than max allowed: 20", "logprobs"),
    (C, {"logprobs": -1}, "positive value", "logprobs"),
    (C, {"n": 2, "temperature": 0}, "greedy", "n"),
    (C, {"n": 0}, "greater than or equal to 1", "n"),
    (C, {"n": 9, "temperature": 1}, "at most 8", "n"),
    (C, {"prompt": ["a", "b", "c"], "n": 3, "temperature": 1}, "at most 8", "n"),
    (C, {"top_p": 0}, "top_p", "top_p"),
    (C, {"top_p": 1.5}, "top_p", "top_p"),
    (C, {"temperature": -1}, "temperature", "temperature"),
    (C, {"top_k": -2}, "top_k", "top_k"),
    (C, {"min_p": 2}, "min_p", "min_p"),
    (C, {"presence_penalty": 3}, "presence_penalty", "presence_penalty"),
    (C, {"frequency_penalty": -2.5}, "frequency_penalty", "frequency_penalty"),
    (C, {"repetition_penalty": 0}, "repetition_penalty", "repetition_penalty"),
    (C, {"seed": 2**63}, "less_than_equal", "seed"),
    (C, {"seed": -(2**63) - 1}, "greater_than_equal", "seed"),
    (C, {"stop": [""]}, "empty string", "stop"),
    (C, {"stop": [f"s{i}" for i in range(17)]}, "at most 16", "stop"),
    (C, {"suffix": "x"}, "suffix is not currently supported", "suffix"),
    (C, {"max_tokens": 512}, "maximum context length is 512", "max_tokens"),
    (C, {"max_tokens": 0}, "at least 1", "max_tokens"),
    (C, {"max_tokens": -1}, "at least 1", "max_tokens"),
    (C, {"max_tokens": "10"}, "valid integer", "max_tokens"),
    (C, {"max_tokens": 1.5}, "valid integer", "max_tokens"),
    (C, {"max_tokens": True}, "valid integer", "max_tokens"),
    (C, {"temperature": "hot"}, "valid number", "temperature"),
    (C, {"stop": 123}, "stop", None),
    (C, {"min_tokens": 5, "max_tokens": 3}, "min_tokens", "min_tokens"),
    (C, {"stream_options": {"include_usage": True}}, "stream=True", "stream_options"),
    (C, {"stream": True, "prompt_logprobs": 1}, "not available when `stream=True`",
     "prompt_logprobs"),
    (C, {"logit_bias": {"49153": 1}}, "49153", "logit_bias"),
    (C, {"logit_bias": {"x": 1}}, "integers", "logit_bias"),
    (C, {"logit_bias": {"5": 101}}, "logit_bias", "logit_bias"),
    (C, {"stop_token_ids": [10**6]}, "stop_token_ids", "stop_token_ids"),
    (C, {"guided_choice": []}, "cannot be an empty list", "guided_choice"),
    (C, {"guided_choice": ["a"], "guided_regex": "a+"}, "one kind", "guided_choice"),
    (C, {"guided_regex": {"pattern": "a+"}}, "guided_regex", "guided_regex"),
    (C, {"guided_json": "[1, 2]"}, "guided_json", "guided_json"),
    (C, {"guided_regex": "(unclosed"}, "Grammar error", None),
    (C, {"guided_grammar": "root ::= missing_rule"}, "Grammar error", None),
    (C, {"guided_decoding_backend": "xgrammar"}, "guided_decoding_backend",
     "guided_decoding_backend"),
    (C, {"structured_outputs": {"choice": ["a"], "regex": "a"}}, "one kind",
     "structured_outputs.choice"),
    (C, {"response_format": {"type": "yaml"}}, "response_format", "response_format"),
    (C, {"use_beam_search": True}, "beam search", "use_beam_search"),
    (C, {"best_of": 2}, "best_of", "best_of"),
    (C, {"priority": 1}, "priority", "priority"),
    (C, {"allowed_token_ids": [1]}, "allowed_token_ids", "allowed_token_ids"),
    (C, {"truncate_prompt_tokens": 10**6}, "truncate_prompt_tokens", "truncate_prompt_tokens"),
    (C, {"truncate_prompt_tokens": 0}, "truncate_prompt_tokens", "truncate_prompt_tokens"),
    (C, {"prompt_logprobs": 21}, "prompt logprobs of 21, which is greater than max allowed: 20",
     "prompt_logprobs"),
    (C, {"prompt_logprobs": -1}, "prompt_logprobs", "prompt_logprobs"),
    (C, {"prompt": "word " * 600}, "maximum context length is 512", None),
    (CHAT, {"messages": []}, "at least 1 item", "messages"),
    (CHAT, {"messages": [{}]}, "role", None),
    (CHAT, {"messages": [{"role": 123, "content": "x"}]}, "valid string", None),
    (CHAT, {"messages": [{"role": "user", "content": 123}]}, "content", None),
    (CHAT, {"messages": "hi"}, "messages", "messages"),
    (CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, "text only",
     "messages"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "video"}]}]},
     "not supported", "messages"),
    (CHAT, {"tools": [{"type": "function", "function": {"name": "f"}}]},
     "--enable-auto-tool-choice", "tool_choice"),
    (CHAT, {"tool_choice": "auto"}, "tool_choice", "tool_choice"),
    (CHAT, {"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice",
     "tool_choice"),
    (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "needs a schema", "response_format.json_schema.schema"),
    (CHAT, {"response_format": {"type": "json_schema"}}, "json_schema",
     "response_format.json_schema"),
    (CHAT, {"top_logprobs": 5}, "`logprobs` must be set to true", "top_logprobs"),
    (CHAT, {"logprobs": True, "top_logprobs": 21}, "greater than max allowed", "logprobs"),
    (CHAT, {"logprobs": True, "top_logprobs": -1}, "top_logprobs", "top_logprobs"),
    (CHAT, {"continue_final_message": True, "add_generation_prompt": True},
     "continue_final_message", "messages"),
    (CHAT, {"continue_final_message": True}, "continue_final_message", "messages"),
    (CHAT, {"chat_template": "{{ 'x' }}"}, "--trust-request-chat-template", "chat_template"),
    (CHAT, {"chat_template_kwargs": {"chat_template": "{{ 'x' }}"}},
     "--trust-request-chat-template", "chat_template"),
    (CHAT, {"chat_template_kwargs": {"tokenize": True}}, "tokenize", "messages"),
    (CHAT, {"chat_template_kwargs": {"messages": []}}, "messages", "messages"),
    (CHAT, {"max_completion_tokens": 600}, "maximum context length is 512",
     "max_completion_tokens"),
    (CHAT, {"max_completion_tokens": 0}, "at least 1", "max_completion_tokens"),
    (CHAT, {"store": True}, "store", "store"),
    (CHAT, {"functions": [{"name": "f"}]}, "deprecated", "functions"),
    (CHAT, {"n": 2, "temperature": 0}, "greedy", "n"),
    (CHAT, {"stream": True, "prompt_logprobs": 0}, "stream=True", "prompt_logprobs"),
    (CHAT, {"messages": [{"role": "user", "content": "x" * 5000}]},
     "maximum context length", "messages"),
]


@pytest.mark.parametrize("path, change, needle, param", BAD_400,
                         ids=[f"{'chat' if p == CHAT else 'cmpl'}-{json.dumps(c)[:40]}"
                              for p, c, _, _ in BAD_400])
def test_bad_request_400(http: httpx.Client, path: str, change: dict[str, Any], needle: str,
                         param: str | None) -> None:
    base = OK_C if path == C else OK_CHAT
    check_error(http.post(path, json={**base, **change}), 400, needle, param)
    good_request_still_works(http)


def test_bad_request_does_no_engine_work(http: httpx.Client) -> None:
    steps = http.get("/metrics").text.count("\n")  # warm the scrape path
    before = _metric(http, "xlaserve:engine_steps_total")
    for _, change, _, _ in BAD_400[:20]:
        http.post(C, json={**OK_C, **change})
    assert _metric(http, "xlaserve:engine_steps_total") == before
    assert steps > 0


def _metric(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(name)


@pytest.mark.parametrize("content, headers, needle", [
    (b'{"prompt": ', {"Content-Type": "application/json"}, "not valid JSON"),
    (b"[]", {"Content-Type": "application/json"}, "must be a JSON object"),
    (b'"x"', {"Content-Type": "application/json"}, "must be a JSON object"),
    (b"42", {"Content-Type": "application/json"}, "must be a JSON object"),
    (b"null", {"Content-Type": "application/json"}, "must be a JSON object"),
    (b"", {"Content-Type": "application/json"}, "empty"),
    (b'{"prompt": "\xff\xfe", "max_tokens": 2}', {"Content-Type": "application/json"},
     "UTF-8"),
    (b'{"prompt": "x", "temperature": NaN}', {"Content-Type": "application/json"},
     "NaN"),
    (b'{"prompt": "x", "temperature": Infinity}', {"Content-Type": "application/json"},
     "Infinity"),
    (b'{"prompt": "x", "temperature": 1e400}', {"Content-Type": "application/json"},
     "finite"),
    (b'{"prompt": "\\ud800 lone", "max_tokens": 2}', {"Content-Type": "application/json"},
     "surrogate"),
    (b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",
     {"Content-Type": "application/json"}, "not valid JSON"),
    (b"[" * 30000 + b"]" * 30000, {"Content-Type": "application/json"}, "nested too deeply"),
    (b'{"prompt": "x"}', {"Content-Type": "text/plain"}, "Only 'application/json'"),
    (b'{"prompt": "x"}', {"Content-Type": "application/x-www-form-urlencoded"},
     "Only 'application/json'"),
    (b'{"prompt": "x"}', {}, "Only 'application/json'"),
])
def test_malformed_bodies(http: httpx.Client, content: bytes, headers: dict[str, str],
                          needle: str) -> None:
    check_error(http.post(C, content=content, headers=headers), 400, needle)
    good_request_still_works(http)


def test_charset_parameter_is_fine(http: httpx.Client) -> None:
    r = http.post(C, content=json.dumps(OK_C).encode(),
                  headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200


def test_error_body_does_not_echo_input(http: httpx.Client) -> None:
    huge = "A" * 50_000
    r = http.post(C, json={**OK_C, "max_tokens": huge})
    err = check_error(r, 400, param="max_tokens")
    assert len(r.content) < 4096 and "AAAA" not in err["message"]


def test_unknown_model_404(http: httpx.Client) -> None:
    for path, body in ((C, OK_C), (CHAT, OK_CHAT)):
        err = check_error(http.post(path, json={**body, "model": "nope"}), 404,
                          "The model `nope` does not exist.", "model")
        assert err["type"] == "NotFoundError"
    check_error(http.post("/tokenize", json={"prompt": "x", "model": "nope"}), 404)
    good_request_still_works(http)


def test_unknown_route_and_wrong_method(http: httpx.Client) -> None:
    check_error(http.get("/v1/nothing-here"), 404)
    check_error(http.get(CHAT), 405)
    check_error(http.delete("/v1/models"), 405)
    check_error(http.post("/health"), 405)
    good_request_still_works(http)


def test_body_over_limit_413(http: httpx.Client) -> None:
    big = {"prompt": "x" * (70 * 1024), "max_tokens": 2}  # the fixture sets 64 KiB
    check_error(http.post(C, json=big), 413)
    good_request_still_works(http)


def test_chunked_body_over_limit_413(http: httpx.Client) -> None:
    def chunks():  # type: ignore[no-untyped-def]
        yield b'{"prompt": "'
        for _ in range(2000):
            yield b"x" * 64
        yield b'", "max_tokens": 2}'

    r = http.post(C, content=chunks(), headers={"Content-Type": "application/json"})
    check_error(r, 413)
    good_request_still_works(http)


def test_unknown_fields_are_accepted(http: httpx.Client) -> None:
    r = http.post(C, json={**OK_C, "not_a_field": {"nested": True}})
    assert r.status_code == 200


def test_oversized_headers_431(http: httpx.Client) -> None:
    check_error(http.get("/health", headers={"X-Big": "a" * 70_000}), 431, "header")
    good_request_still_works(http)
