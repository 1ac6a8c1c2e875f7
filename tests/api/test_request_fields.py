"""No silent request fields: every field of every generation and tokenize request model is used,
or refused with a 400 that names it (the probes and the rules are in ``field_probes.py``).

The server is the real HTTP stack around the fake engine, which records what reaches it (prompt
ids, ``SamplingParams``, ``cache_salt``). It uses Gemma 3's tokenizer, which adds ``<bos>`` (so
``add_special_tokens`` shows), and ``FIELDS_TEMPLATE``, which reads every template input (so a
message field or template variable the server dropped shows in the prompt). The pooling request
models are checked the same way against real pooling servers in
``tests/pooling/test_pooling_http.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from models import assets
from models.tokenizer import load_tokenizer
from serving.api import pooling_protocol, protocol
from serving.api.protocol import OpenAIBaseModel
from serving.engine.detokenizer import IncrementalDetokenizer
from tests.api.fake_engine import load_smollm2_tokenizer
from tests.api.field_probes import (
    ALL_ROUTES,
    CHAT_BASE,
    FIELDS_TEMPLATE,
    GENERATION_ROUTES,
    Recorder,
    Route,
    case_id,
    cases,
    check_field,
    nested_models,
    send,
    stale_probes,
)
from tests.api.server_utils import ServerProcess, fake_server


@pytest.fixture(scope="module")
def fields_server(tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[tuple[ServerProcess, Recorder]]:
    tmp = tmp_path_factory.mktemp("fields")
    record = tmp / "engine.jsonl"
    server = fake_server(tmp, "--max-model-len", "512", "--chat-template", FIELDS_TEMPLATE,
                         "--trust-request-chat-template", name="fields",
                         XLASERVE_FAKE_TOKENIZER="gemma3-270m",
                         XLASERVE_FAKE_RECORD=str(record)).start(300)
    yield server, Recorder(record)
    server.stop()


@pytest.fixture(scope="module")
def client(fields_server: tuple[ServerProcess, Recorder]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fields_server[0].base_url, timeout=60) as c:
        yield c


@pytest.mark.parametrize("case", list(cases(GENERATION_ROUTES)), ids=case_id)
def test_field_is_used_or_refused(case: tuple[Route, str], client: httpx.Client,
                                  fields_server: tuple[ServerProcess, Recorder]) -> None:
    route, path = case
    check_field(client, route, path, fields_server[1])


def test_probe_tables_name_only_existing_fields() -> None:
    assert stale_probes(ALL_ROUTES) == []


def test_every_request_model_is_probed() -> None:
    """Every request model (an ``OpenAIBaseModel``) is a route's model, nested in one, or a
    base class of one (whose fields the subclass enumerates)."""
    def subclasses(cls: type) -> set[type]:
        return {c for s in cls.__subclasses__() for c in {s} | subclasses(s)}

    declared = {m for m in subclasses(OpenAIBaseModel)
                if m.__module__ in (protocol.__name__, pooling_protocol.__name__)}
    covered: set[type] = set()
    for route in ALL_ROUTES:
        covered |= nested_models(route.model)
    missing = [m.__name__ for m in declared
               if m not in covered and not any(issubclass(c, m) for c in covered)]
    assert missing == []


def test_cache_salt_reaches_the_engine_and_empty_is_refused(
        client: httpx.Client, fields_server: tuple[ServerProcess, Recorder]) -> None:
    recorder = fields_server[1]
    for path, base in (("/v1/completions", {"prompt": ["a", "b"], "max_tokens": 2}),
                       ("/v1/chat/completions", CHAT_BASE)):
        salted = send(client, path, {**base, "cache_salt": "tenant-a"}, recorder)
        plain = send(client, path, base, recorder)
        assert salted.status == plain.status == 200
        assert {r["kwargs"]["cache_salt"] for r in salted.records} == {"tenant-a"}
        assert {r["kwargs"]["cache_salt"] for r in plain.records} == {None}
        for bad in ("", 5, "x" * 257):
            err = send(client, path, {**base, "cache_salt": bad}, recorder)
            assert err.status == 400 and err.body["error"]["param"] == "cache_salt", err.body
            assert err.records == []  # refused before any engine work
    empty = send(client, "/v1/completions", {"prompt": "a", "cache_salt": ""}, None)
    assert empty.body["error"]["message"] == \
        "Parameter 'cache_salt' must be a non-empty string if provided."


def _detokenize(tokenizer: object, prompt: list[int], output: list[int], *, skip: bool,
                spaces: bool) -> str:
    d = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip,
                               spaces_between_special_tokens=spaces, stop=[],
                               include_stop_str_in_output=False)
    for t in output:
        d.add(t)
    d.flush()
    return d.take(True)


def test_spaces_between_special_tokens_changes_the_text() -> None:
    """The engine side of the field (a fast tokenizer's ``decode`` ignores it): false drops the
    separator a WordPiece decoder writes between consecutive added tokens; byte-level BPE puts
    none there, so the text is the same either way; with skip_special_tokens there is nothing
    to separate."""
    bert = load_tokenizer(assets.fetch("all-minilm-l6-v2"))
    cls, sep = bert.cls_token_id, bert.sep_token_id
    prompt = bert.encode("hello", add_special_tokens=False)
    out = [*bert.encode("world", add_special_tokens=False), sep, cls, sep,
           *bert.encode("again", add_special_tokens=False)]
    assert _detokenize(bert, prompt, out, skip=False, spaces=True) == \
        " world [SEP] [CLS] [SEP] again"
    assert _detokenize(bert, prompt, out, skip=False, spaces=False) == \
        " world [SEP][CLS][SEP] again"
    assert _detokenize(bert, prompt, out, skip=True, spaces=False) == " world again"
    # The first output token follows the prompt's last token: an added token there counts.
    assert _detokenize(bert, [cls], [sep], skip=False, spaces=False) == "[SEP]"

    smol = load_smollm2_tokenizer()
    end, start = smol.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"])
    out = [*smol.encode(" world"), end, start, *smol.encode("again")]
    for spaces in (True, False):
        assert _detokenize(smol, smol.encode("hello"), out, skip=False, spaces=spaces) == \
            " world<|im_end|><|im_start|>again"
