"""Structured outputs end to end: the official ``openai`` client against a real ``serve`` of
SmolLM2 on a loopback port. Every output is checked with an independent tool: ``jsonschema``,
``re.fullmatch`` with ASCII classes (llguidance's ``\\d`` is Unicode), set membership, a Lark
parser; never with llguidance itself.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import jsonschema
import lark
import openai
import pydantic
import pytest

from tests.api.server_utils import REPO, ServerProcess, real_server, repo_env

NAME = "smollm2"
PERSON = {"type": "object",
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "city": {"enum": ["Paris", "Rome", "Oslo"]},
                         "member": {"type": "boolean"}},
          "required": ["name", "age", "city", "member"], "additionalProperties": False}
LARK = r"""
start: term OP term "=" NUMBER
term: NUMBER | "(" NUMBER OP NUMBER ")"
OP: "+" | "-" | "*"
NUMBER: /[0-9]{1,3}/
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("structured")
    s = real_server(tmp, "--max-model-len", "1024", "--max-num-seqs", "32", "--max-n", "4",
                    "--served-model-name", NAME,
                    "--chat-template", "configs/chat_templates/smollm2-tools.jinja",
                    "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                    name="structured").start(900)
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=300) as c:
        yield c


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def recompiles(http: httpx.Client) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("xlaserve:num_recompiles"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("num_recompiles missing from /metrics")


def test_32_concurrent_json_schema_requests_all_stop_and_validate(client: openai.OpenAI,
                                                                  http: httpx.Client) -> None:
    """32 at once (one 32-row step), sampled with different seeds, mixed with free requests:
    every constrained answer stops on its own and validates; nothing was compiled."""
    def constrained(i: int) -> tuple[str | None, str]:
        r = client.chat.completions.create(
            model=NAME, messages=ask(f"Describe person number {i} as JSON."), max_tokens=300,
            temperature=0.7, seed=i, extra_body={"guided_json": PERSON})
        return r.choices[0].finish_reason, r.choices[0].message.content or ""

    def free(i: int) -> str | None:
        r = client.completions.create(model=NAME, prompt=f"Count to {i}:", max_tokens=16,
                                      temperature=0)
        return r.choices[0].finish_reason

    with ThreadPoolExecutor(40) as pool:
        frees = [pool.submit(free, i) for i in range(8)]
        results = list(pool.map(constrained, range(32)))
    for finish, text in results:
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), PERSON)
    assert all(f.result() in ("stop", "length") for f in frees)
    assert recompiles(http) == 0


def test_regex_choice_and_grammar_on_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=NAME, prompt="A US phone number: ", max_tokens=30, temperature=0,
        extra_body={"guided_regex": r"\(\d{3}\) \d{3}-\d{4}"})
    assert re.fullmatch(r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}", r.choices[0].text, re.ASCII)
    assert r.choices[0].finish_reason == "stop"

    options = ["positive", "negative", "neutral"]
    r = client.completions.create(
        model=NAME, prompt="Review: 'I loved it!' Sentiment:", max_tokens=10, temperature=0,
        extra_body={"guided_choice": options})
    assert r.choices[0].text in options

    r = client.completions.create(
        model=NAME, prompt="An arithmetic expression: ", max_tokens=40, temperature=0,
        extra_body={"guided_grammar": LARK})
    assert r.choices[0].finish_reason == "stop"
    lark.Lark(LARK).parse(r.choices[0].text)  # raises if it is not in the language


def test_n3_streamed_choices_each_follow_the_grammar(http: httpx.Client) -> None:
    """n = 3 sampled choices, streamed: each choice's text, concatenated from its deltas, is a
    complete instance of the regex."""
    body = {"model": NAME, "prompt": "A colour code:", "max_tokens": 20, "n": 3,
            "temperature": 1.0, "seed": 3, "stream": True,
            "structured_outputs": {"regex": "#[0-9a-f]{6}"}}
    texts = ["", "", ""]
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    texts[c["index"]] += c["text"]
    for t in texts:
        assert re.fullmatch(r"#[0-9a-f]{6}", t, re.ASCII), texts


def test_streamed_json_concatenates_to_valid_json(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=NAME, messages=ask("Give me a person as JSON."), max_tokens=300, temperature=0,
        stream=True, response_format={"type": "json_schema", "json_schema": {
            "name": "person", "schema": PERSON, "strict": True}})
    parts, finish = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert len([p for p in parts if p]) > 3  # really streamed in pieces
    jsonschema.validate(json.loads("".join(parts)), PERSON)
    assert finish == "stop"


class Capital(pydantic.BaseModel):
    country: str
    capital: str
    population_millions: int


def test_parse_with_a_pydantic_model_and_json_object(client: openai.OpenAI) -> None:
    r = client.chat.completions.parse(model=NAME, messages=ask("The capital of France?"),
                                      max_tokens=200, temperature=0, response_format=Capital)
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Capital)
    r2 = client.chat.completions.create(model=NAME, messages=ask("A JSON object about cats."),
                                        max_tokens=200, temperature=0,
                                        response_format={"type": "json_object"})
    if r2.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r2.choices[0].message.content or ""), dict)
    else:  # cut by max_tokens: still a valid prefix of an object
        assert (r2.choices[0].message.content or "").lstrip().startswith("{")


def test_valid_invalid_valid_grammar_requests(client: openai.OpenAI) -> None:
    """A grammar that does not compile is a 400 before the engine sees it, and it does not
    hurt the requests after it (same grammar valid again, and its cached error)."""
    def good() -> None:
        r = client.completions.create(model=NAME, prompt="Yes or no?", max_tokens=5,
                                      temperature=0, extra_body={"guided_choice": ["yes", "no"]})
        assert r.choices[0].text in ("yes", "no")

    good()
    for _ in range(2):  # the second one comes from the grammar cache's stored error
        with pytest.raises(openai.BadRequestError, match="Grammar error"):
            client.completions.create(model=NAME, prompt="x", max_tokens=5,
                                      extra_body={"guided_grammar": "start: undefined_rule"})
    good()


def test_mixed_traffic_leaves_free_requests_unchanged(http: httpx.Client) -> None:
    """A greedy free request gives the same tokens alone and while constrained requests run
    beside it (the constrained rows' masks never touch its row)."""
    free: dict[str, Any] = {"model": NAME, "prompt": "The history of Rome", "max_tokens": 40,
                            "temperature": 0, "ignore_eos": True, "return_token_ids": True,
                            "logprobs": 2}
    alone = http.post("/v1/completions", json=free).json()["choices"][0]

    def constrained(i: int) -> None:
        r = http.post("/v1/completions", json={
            "model": NAME, "prompt": f"Item {i}:", "max_tokens": 60, "temperature": 0.5,
            "seed": i, "guided_json": PERSON})
        assert r.status_code == 200

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(constrained, i) for i in range(6)]
        mixed = http.post("/v1/completions", json=free).json()["choices"][0]
        for f in futures:
            f.result()
    assert mixed["token_ids"] == alone["token_ids"]  # bitwise the same tokens
    # logprobs to float rounding: the model step itself runs in another T bucket in a batch
    assert mixed["logprobs"]["tokens"] == alone["logprobs"]["tokens"]
    assert mixed["logprobs"]["token_logprobs"] == pytest.approx(
        alone["logprobs"]["token_logprobs"], abs=1e-4)


def test_docs_examples_run_as_written(server: ServerProcess) -> None:
    """docs/STRUCTURED.md's SDK and curl examples against this live server."""
    text = (REPO / "docs" / "STRUCTURED.md").read_text()
    code, tools, _reasoning = re.findall(r"```python\n(.*?)```", text, flags=re.S)

    def run(code: str) -> list[str]:
        out = subprocess.run([sys.executable, "-c",
                              code.replace("http://localhost:8000", server.base_url)],
                             capture_output=True, text=True, env=repo_env(), timeout=600)
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()

    label, date, city, capital = run(code)
    assert label in ("positive", "negative")
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", date, re.ASCII)
    assert "city" in city and "country" in city
    assert "capital=" in capital
    call, *answer = run(tools)
    assert call.startswith("get_weather {'city': ")
    assert "".join(answer).strip()
    (curl,) = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    out = subprocess.run(["bash", "-euo", "pipefail", "-c",
                          curl.replace("http://localhost:8000", server.base_url)],
                         capture_output=True, text=True, env=repo_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["choices"][0]["text"] in ("yes", "no")


# -- tools ------------------------------------------------------------------------------------
WEATHER = {"type": "object", "properties": {"city": {"type": "string"},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"timezone": {"type": "string"}},
        "required": ["timezone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
WEATHER_Q = ask("What is the weather in Paris, in celsius?")


def streamed_calls(client: openai.OpenAI, **kw: Any) -> tuple[dict[int, dict[str, str]],
                                                             str | None, str]:
    """Calls assembled from the stream's tool-call deltas, the finish reason, the content."""
    calls: dict[int, dict[str, str]] = {}
    finish, content = None, ""
    for chunk in client.chat.completions.create(model=NAME, stream=True, **kw):
        for c in chunk.choices:
            content += c.delta.content or ""
            finish = c.finish_reason or finish
            for t in c.delta.tool_calls or []:
                call = calls.setdefault(t.index, {"id": "", "name": "", "arguments": ""})
                if t.id:
                    assert not call["id"]  # the id comes once, on the first piece
                    call["id"] = t.id
                if t.function and t.function.name:
                    call["name"] += t.function.name
                if t.function and t.function.arguments:
                    call["arguments"] += t.function.arguments
    return calls, finish, content


def test_named_tool_choice(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(messages=WEATHER_Q, tools=TOOLS, max_tokens=80, temperature=0,
                              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    r = client.chat.completions.create(model=NAME, **kw)
    msg = r.choices[0].message
    assert msg.content == "" and r.choices[0].finish_reason == "stop"
    (call,) = msg.tool_calls or []
    assert call.function.name == "get_weather" and call.id.startswith("chatcmpl-tool-")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    calls, finish, content = streamed_calls(client, **kw)
    assert finish == "stop" and content == ""
    assert calls[0]["name"] == "get_weather"
    assert calls[0]["arguments"] == call.function.arguments  # fragments concatenate exactly


def test_required_tool_choice(client: openai.OpenAI) -> None:
    """required: the output is constrained to a non-empty array of closed {"name",
    "parameters"} objects, so even SmolLM2 ends it; every element is a call whose arguments
    validate; finish_reason "tool_calls"; streamed fragments give the same calls."""
    kw: dict[str, Any] = dict(messages=WEATHER_Q, tools=TOOLS, max_tokens=200, temperature=0,
                              tool_choice="required")
    r = client.chat.completions.create(model=NAME, **kw)
    assert r.choices[0].finish_reason == "tool_calls", r.choices[0].message
    got = r.choices[0].message.tool_calls or []
    assert got and not r.choices[0].message.content
    for call in got:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    calls, finish, content = streamed_calls(client, **kw)
    assert finish == "tool_calls" and not content
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in got]


HERMES_CALL = (r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]+", '
               r'"unit": "(celsius|fahrenheit)"\}\}\n</tool_call>')


def test_auto_tool_choice_with_the_hermes_parser(client: openai.OpenAI) -> None:
    """auto on SmolLM2 with the tools template: the model's Hermes-format call (forced here with
    a regex, which auto allows, since SmolLM2-135M rarely calls on its own) is parsed into a
    call, streaming or not; a plain answer stays content."""
    kw: dict[str, Any] = dict(messages=WEATHER_Q, tools=TOOLS, max_tokens=80, temperature=0,
                              extra_body={"guided_regex": HERMES_CALL})
    r = client.chat.completions.create(model=NAME, **kw)
    assert r.choices[0].finish_reason == "tool_calls"
    (call,) = r.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    assert not r.choices[0].message.content
    calls, finish, content = streamed_calls(client, **kw)
    assert finish == "tool_calls" and not content.strip()
    assert json.loads(calls[0]["arguments"]) == json.loads(call.function.arguments)

    plain = client.chat.completions.create(
        model=NAME, messages=WEATHER_Q, tools=TOOLS, max_tokens=20, temperature=0,
        extra_body={"guided_regex": "It is sunny[.]"})
    assert plain.choices[0].message.content == "It is sunny."
    assert not plain.choices[0].message.tool_calls
    assert plain.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body, needle", [
    ({"tool_choice": "required"}, "`tools` must be set"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "does not match any"),
    ({"tools": TOOLS, "tool_choice": {}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "Invalid value for `tool_choice`"),
    ({"tools": TOOLS, "tool_choice": "required", "guided_json": WEATHER}, "either"),
    ({"tools": [{"type": "function"}]}, "tools[0]"),
])
def test_tool_400s(http: httpx.Client, body: dict[str, Any], needle: str) -> None:
    r = http.post("/v1/chat/completions", json={"model": NAME, "messages": WEATHER_Q, **body})
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]
