"""Auth, request ids, CORS, chat-template trust and the template sandbox over real HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from serving.api.app import PUBLIC_PATHS, create_app
from serving.api.args import ServerArgs
from tests.api.conftest import write
from tests.api.server_utils import ServerProcess, fake_server
from tests.api.test_http_errors import check_error

MSG = [{"role": "user", "content": "hi"}]
EVIL = ("{% for m in messages %}{{ m.content }}{% endfor %}"
        "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}")


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory,
           smollm2_tokenizer) -> Iterator[tuple[ServerProcess, Path]]:  # type: ignore[no-untyped-def]
    """API keys, request-id headers, CORS for one origin, and a malicious operator template."""
    tmp = tmp_path_factory.mktemp("locked")
    marker = tmp / "pwned"
    template = write(tmp / "evil.jinja", EVIL.replace("MARKER", str(marker)))
    server = fake_server(tmp, "--api-key", "key-one", "key-two", "--enable-request-id-headers",
                         "--allowed-origins", "http://ok.example", "--chat-template",
                         str(template), name="locked").start(120)
    yield server, marker
    server.stop()


@pytest.fixture(scope="module")
def untemplated(tmp_path_factory: pytest.TempPathFactory,
                smollm2_tokenizer) -> Iterator[ServerProcess]:  # type: ignore[no-untyped-def]
    """No chat template anywhere, request templates trusted, two served names."""
    tmp = tmp_path_factory.mktemp("untemplated")
    server = fake_server(tmp, "--trust-request-chat-template", "--served-model-name", "alpha",
                         "beta", "--allowed-origins", "*", name="untemplated",
                         XLASERVE_FAKE_NO_TEMPLATE="1").start(120)
    yield server
    server.stop()


def routes() -> list[tuple[str, str]]:
    """Every (path, method) the app registers: new routes are covered automatically."""
    app = create_app(ServerArgs(), lambda: None, name="route_enumeration")  # type: ignore[arg-type,return-value]
    out = set()
    for route in app.router.routes:
        for method in route.methods:
            if method != "OPTIONS":
                out.add(("/" + route.path, method))
    return sorted(out)


ROUTES = routes()


@pytest.mark.parametrize("path, method", ROUTES, ids=[f"{m} {p}" for p, m in ROUTES])
def test_auth_required_everywhere_but_public(locked: tuple[ServerProcess, Path], path: str,
                                             method: str) -> None:
    server, _ = locked
    public = path.strip("/") in PUBLIC_PATHS
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic key-one"},
                    {"Authorization": "key-one"}, {"Authorization": "Bearer key-one-extra"}):
        r = httpx.request(method, server.url(path), headers=headers,
                          json={} if method == "POST" else None)
        if public:
            assert r.status_code != 401
        else:
            err = check_error(r, 401, "API key")
            assert err["type"] == "AuthenticationError"
            assert r.headers.get("www-authenticate") == "Bearer"
    r = httpx.request(method, server.url(path) + "?api_key=key-one",
                      json={} if method == "POST" else None)
    assert (r.status_code != 401) if public else (r.status_code == 401)


def test_auth_bypass_paths_do_not_get_2xx(locked: tuple[ServerProcess, Path]) -> None:
    server, _ = locked
    for path in ("//v1/models", "/V1/models", "/v1/%6dodels", "/health/../v1/models",
                 "/v1/models/", "/v1/../v1/models"):
        r = httpx.get(server.base_url + path)
        assert not 200 <= r.status_code < 300, (path, r.status_code)


def test_valid_keys_work(locked: tuple[ServerProcess, Path]) -> None:
    server, _ = locked
    for key in ("key-one", "key-two"):
        client = openai.OpenAI(base_url=server.url("/v1"), api_key=key, max_retries=0)
        assert client.models.list().data[0].id == "fake-smollm2"
        r = client.completions.create(model="fake-smollm2", prompt="x", max_tokens=2)
        assert r.choices[0].text
    r = httpx.get(server.url("/v1/models"), headers={"Authorization": "bearer key-two"})
    assert r.status_code == 200  # the scheme is case-insensitive
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url("/v1"), api_key="nope",
                      max_retries=0).models.list()


def test_request_id_headers(locked: tuple[ServerProcess, Path]) -> None:
    server, _ = locked
    auth = {"Authorization": "Bearer key-one"}
    r = httpx.get(server.url("/health"))
    assert len(r.headers["x-request-id"]) == 32
    int(r.headers["x-request-id"], 16)
    r = httpx.post(server.url("/v1/completions"), headers={**auth, "X-Request-Id": "my-id-1"},
                   json={"prompt": "x", "max_tokens": 2})
    assert r.headers["x-request-id"] == "my-id-1" and r.json()["id"] == "cmpl-my-id-1"
    # errors and streams carry it too
    r = httpx.post(server.url("/v1/completions"), headers={"X-Request-Id": "denied"}, json={})
    assert r.status_code == 401 and r.headers["x-request-id"] == "denied"
    with httpx.stream("POST", server.url("/v1/completions"),
                      headers={**auth, "X-Request-Id": "s-1"},
                      json={"prompt": "x", "max_tokens": 2, "stream": True}) as s:
        assert s.headers["x-request-id"] == "s-1"
        s.read()
    # a header that is not a plain token is replaced, never echoed
    r = httpx.get(server.url("/health"), headers={"X-Request-Id": "a b<script>"})
    assert r.headers["x-request-id"] != "a b<script>"


def test_cors(locked: tuple[ServerProcess, Path]) -> None:
    server, _ = locked
    pre = httpx.options(server.url("/v1/chat/completions"), headers={
        "Origin": "http://ok.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status_code == 204
    assert pre.headers["access-control-allow-origin"] == "http://ok.example"
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert "authorization" in pre.headers["access-control-allow-headers"]
    r = httpx.get(server.url("/v1/models"), headers={"Origin": "http://ok.example",
                                                      "Authorization": "Bearer key-one"})
    assert r.headers["access-control-allow-origin"] == "http://ok.example"
    r = httpx.get(server.url("/v1/models"), headers={"Origin": "http://evil.example",
                                                      "Authorization": "Bearer key-one"})
    assert "access-control-allow-origin" not in r.headers


def test_no_cors_by_default(fake: ServerProcess) -> None:
    r = httpx.get(fake.url("/health"), headers={"Origin": "http://ok.example"})
    assert "access-control-allow-origin" not in r.headers


def test_malicious_operator_template_is_contained(locked: tuple[ServerProcess, Path]) -> None:
    server, marker = locked
    r = httpx.post(server.url("/v1/chat/completions"),
                   headers={"Authorization": "Bearer key-one"},
                   json={"messages": MSG, "max_tokens": 2})
    err = check_error(r, 400, "sandbox")
    assert "__init__" in err["message"]
    r = httpx.post(server.url("/tokenize"), headers={"Authorization": "Bearer key-one"},
                   json={"messages": MSG})
    check_error(r, 400, "sandbox")
    assert not marker.exists()
    assert "Detected the chat template content format to be 'string'" in server.log()
    r = httpx.post(server.url("/v1/completions"), headers={"Authorization": "Bearer key-one"},
                   json={"prompt": "x", "max_tokens": 2})
    assert r.status_code == 200


def test_logs_never_hold_keys_or_prompts(locked: tuple[ServerProcess, Path]) -> None:
    server, _ = locked
    httpx.post(server.url("/v1/completions"), headers={"Authorization": "Bearer key-one"},
               json={"prompt": "CANARY-PROMPT-123", "max_tokens": 2})
    log = server.log()
    assert "CANARY-PROMPT-123" not in log
    assert "key-one" not in log and "key-two" not in log


def test_no_template_gives_clear_400(untemplated: ServerProcess) -> None:
    r = httpx.post(untemplated.url("/v1/chat/completions"),
                   json={"messages": MSG, "max_tokens": 2})
    check_error(r, 400, "--chat-template")
    assert "no chat template" in untemplated.log()
    r = httpx.post(untemplated.url("/v1/completions"), json={"prompt": "x", "max_tokens": 2})
    assert r.status_code == 200


def test_trusted_request_templates(untemplated: ServerProcess, tmp_path: Path) -> None:
    url = untemplated.url("/v1/chat/completions")
    string_t = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    list_t = ("{% for m in messages %}[{{ m.role }}] {% for p in m.content %}{{ p.text }}"
              "{% endfor %}{{ '\\n' }}{% endfor %}")
    results = []
    for template in (string_t, list_t):
        r = httpx.post(url, json={"messages": [{"role": "user", "content": "hi"}],
                                  "max_tokens": 3, "temperature": 0,
                                  "chat_template": template, "return_token_ids": True}, timeout=60)
        assert r.status_code == 200, r.text
        results.append(r.json()["prompt_token_ids"])
    assert results[0] == results[1]  # both formats render "[user] hi\n"
    r = httpx.post(untemplated.url("/tokenize"), json={
        "messages": [{"role": "user", "content": "hi"}],
        "chat_template_kwargs": {"chat_template": list_t}}, timeout=60)
    assert r.json()["tokens"] == results[0]
    marker = tmp_path / "pwned"
    r = httpx.post(url, json={"messages": MSG, "max_tokens": 2,
                              "chat_template": EVIL.replace("MARKER", str(marker))}, timeout=60)
    check_error(r, 400, "sandbox")
    slow = ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
            "{% endfor %}")
    r = httpx.post(url, json={"messages": MSG, "max_tokens": 2, "chat_template": slow},
                   timeout=60)
    check_error(r, 400, "time limit")
    assert not marker.exists()
    assert httpx.get(untemplated.url("/health")).status_code == 200


def test_served_model_names(untemplated: ServerProcess) -> None:
    models = httpx.get(untemplated.url("/v1/models")).json()["data"]
    assert [m["id"] for m in models] == ["alpha", "beta"]
    r = httpx.post(untemplated.url("/v1/completions"), json={"model": "beta", "prompt": "x",
                                                             "max_tokens": 2})
    assert r.json()["model"] == "beta"
    r = httpx.post(untemplated.url("/v1/completions"), json={"prompt": "x", "max_tokens": 2})
    assert r.json()["model"] == "alpha"
    check_error(httpx.post(untemplated.url("/v1/completions"),
                           json={"model": "fake-smollm2", "prompt": "x"}), 404,
                "The model `fake-smollm2` does not exist.")


def test_wildcard_cors(untemplated: ServerProcess) -> None:
    r = httpx.get(untemplated.url("/health"), headers={"Origin": "http://any.example"})
    assert r.headers["access-control-allow-origin"] == "*"
