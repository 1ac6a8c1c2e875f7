"""Tokenizers (models/tokenizer.py): the torch-free GGUF tokenizer against HF's, cache, HF dirs.

The reference ids come from ``tests/golden/tokenizer_<model>.json``, written by
``scripts/make_golden.py`` with transformers + torch (``AutoTokenizer.from_pretrained(dir,
gguf_file=...)``, ``add_special_tokens=True``) over ``tests/data/tokenizer_corpus.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedTokenizerFast

from models import assets
from models.gguf import read_header
from models.tokenizer import TokenizerError, load_tokenizer, tokenizer_from_gguf

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests" / "data" / "tokenizer_corpus.json"
GOLDEN = REPO / "tests" / "golden"
MODELS = {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma3-270m"}

SMOLLM2_FRANCE = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    data = json.loads(CORPUS.read_text(encoding="utf-8"))
    assert isinstance(data, list) and all(isinstance(s, str) for s in data)
    return data


@pytest.fixture(scope="module")
def metadata() -> dict[str, dict[str, Any]]:
    return {name: read_header(assets.fetch(alias)).metadata for name, alias in MODELS.items()}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tokenizer_cache")


@pytest.fixture(scope="module")
def built(
    metadata: dict[str, dict[str, Any]], cache_dir: Path
) -> dict[str, PreTrainedTokenizerFast]:
    """Cold builds (into an empty cache dir), so the tests cover the GGUF -> tokenizer path."""
    out = {}
    for name, meta in metadata.items():
        key = read_header(assets.fetch(MODELS[name])).header_sha256
        out[name] = tokenizer_from_gguf(meta, cache_key=key, cache_dir=cache_dir, progress=False)
    assert len(list(cache_dir.iterdir())) == len(MODELS)  # both were built, not found
    return out


def test_corpus_covers_the_hard_cases(corpus: list[str]) -> None:
    assert len(corpus) >= 200 and len(set(corpus)) == len(corpus)
    text = "".join(corpus)

    def has(pred: Any) -> bool:
        return any(pred(c) for c in text)

    assert has(lambda c: "\u4e00" <= c <= "\u9fff")  # CJK
    assert has(lambda c: "\u3040" <= c <= "\u30ff")  # kana
    assert has(lambda c: "\uac00" <= c <= "\ud7a3")  # Hangul
    assert has(lambda c: ord(c) >= 0x1F300)  # emoji (astral plane)
    assert has(lambda c: unicodedata.bidirectional(c) in ("R", "AL"))  # RTL
    assert has(lambda c: unicodedata.combining(c) > 0)  # combining marks
    assert "\u200d" in text  # ZWJ sequences
    assert any("\t" in s for s in corpus) and any("\n\n" in s for s in corpus)
    assert any("   " in s for s in corpus)  # whitespace runs
    assert any("<|im_start|>" in s for s in corpus) and any("<start_of_turn>" in s for s in corpus)
    assert any("def " in s for s in corpus) and any("https://" in s for s in corpus)
    assert any(s.isdigit() for s in corpus) and "" in corpus


@pytest.mark.parametrize("name", sorted(MODELS))
def test_ids_equal_hf_reference(
    name: str, corpus: list[str], built: dict[str, PreTrainedTokenizerFast]
) -> None:
    path = GOLDEN / f"tokenizer_{name}.json"
    if not path.is_file():
        pytest.fail(f"missing {path.relative_to(REPO)}: run scripts/make_golden.py (needs torch)")
    golden = json.loads(path.read_text(encoding="utf-8"))
    sha = golden.get("corpus_sha256", golden.get("corpus_sha"))
    assert sha == hashlib.sha256(CORPUS.read_bytes()).hexdigest(), "golden made from another corpus"
    assert golden.get("add_special_tokens", True) is True
    want = golden["ids"]
    assert len(want) == len(corpus)
    tok = built[name]
    mismatches = [
        (s, got, ref)
        for s, ref in zip(corpus, want, strict=True)
        if (got := tok(s, add_special_tokens=True)["input_ids"]) != ref
    ]
    assert not mismatches, f"{len(mismatches)} strings differ, first: {mismatches[0]!r}"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_decode_inverts_encode(
    name: str, corpus: list[str], built: dict[str, PreTrainedTokenizerFast]
) -> None:
    tok = built[name]
    for s in corpus:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == s, s


def test_special_tokens_and_bos(built: dict[str, PreTrainedTokenizerFast]) -> None:
    smol, gemma = built["smollm2"], built["gemma3"]
    assert (smol.bos_token, smol.eos_token, smol.unk_token, smol.pad_token) == (
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_end|>",
    )  # fmt: skip
    assert (smol.bos_token_id, smol.eos_token_id, smol.pad_token_id) == (1, 2, 2)
    # SmolLM2 adds no BOS (tokenizer.ggml.add_bos_token = False); control tokens stay whole.
    assert smol("<|im_start|>user\nhi<|im_end|>")["input_ids"][0] == 1
    assert smol("<|im_start|>user\nhi<|im_end|>")["input_ids"][-1] == 2
    assert smol("hi")["input_ids"][0] != 1
    # Gemma 3 adds <bos> (add_bos_token = True) and no <eos>.
    assert (gemma.bos_token, gemma.eos_token, gemma.pad_token) == ("<bos>", "<eos>", "<pad>")
    ids = gemma("<start_of_turn>user")["input_ids"]
    assert ids[0] == 2 and ids[1] == gemma.convert_tokens_to_ids("<start_of_turn>") == 105
    assert ids[-1] != 1
    assert gemma.chat_template is None  # the base model's GGUF has none


def test_smollm2_chat_template(built: dict[str, PreTrainedTokenizerFast]) -> None:
    tok = built["smollm2"]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == SMOLLM2_FRANCE
    assert len(tok(text, add_special_tokens=False)["input_ids"]) == 37


def test_build_is_deterministic(
    metadata: dict[str, dict[str, Any]], built: dict[str, PreTrainedTokenizerFast]
) -> None:
    again = tokenizer_from_gguf(metadata["smollm2"], progress=False)
    assert again.backend_tokenizer.to_str() == built["smollm2"].backend_tokenizer.to_str()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cache_round_trip(
    name: str,
    cache_dir: Path,
    corpus: list[str],
    metadata: dict[str, dict[str, Any]],
    built: dict[str, PreTrainedTokenizerFast],
) -> None:
    """``built`` stored each tokenizer in ``cache_dir``; a second call loads it back, equal."""
    key = read_header(assets.fetch(MODELS[name])).header_sha256
    # Prove the call reads the entry: a cache hit must not need the vocabulary at all.
    stripped = {k: v for k, v in metadata[name].items() if not k.startswith("tokenizer.")}
    cached = tokenizer_from_gguf(stripped, cache_key=key, cache_dir=cache_dir, progress=False)
    cold = built[name]
    assert cached.chat_template == cold.chat_template
    assert cached.all_special_tokens == cold.all_special_tokens
    assert cached.add_bos_token == cold.add_bos_token
    assert cached.add_eos_token == cold.add_eos_token
    for s in corpus:
        assert cached(s)["input_ids"] == cold(s)["input_ids"], s


def test_damaged_cache_entry_is_rebuilt(tmp_path: Path, metadata: dict[str, Any]) -> None:
    meta = metadata["smollm2"]
    tokenizer_from_gguf(meta, cache_key="k", cache_dir=tmp_path, progress=False)
    (entry,) = tmp_path.iterdir()
    (entry / "tokenizer.json").write_text("{ not json")
    tok = tokenizer_from_gguf(meta, cache_key="k", cache_dir=tmp_path, progress=False)
    assert tok("Hello")["input_ids"] == [19556]


def test_from_gguf_reader_too(built: dict[str, PreTrainedTokenizerFast]) -> None:
    from gguf import GGUFReader

    tok = tokenizer_from_gguf(GGUFReader(assets.fetch("smollm2-135m-instruct")), progress=False)
    assert tok.backend_tokenizer.to_str() == built["smollm2"].backend_tokenizer.to_str()


def test_no_torch_needed() -> None:
    """Build and use the GGUF tokenizer in a process where ``import torch`` fails."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from models import assets\n"
        "from models.gguf import load_gguf\n"
        "m = load_gguf(assets.fetch('smollm2-135m-instruct'), tokenizer_cache=False,"
        " progress=False)\n"
        "print(m.tokenizer('Hello world')['input_ids'])\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[19556, 905]"


# ----------------------------------------------------------------------------------------------
# HF directories
# ----------------------------------------------------------------------------------------------


def test_load_tokenizer_hf_dir_minilm() -> None:
    tok = load_tokenizer(assets.fetch("all-minilm-l6-v2"))
    assert tok("hello world")["input_ids"] == [101, 7592, 2088, 102]


@pytest.mark.parametrize("template_in", ["jinja", "tokenizer_config"])
def test_load_tokenizer_hf_dir_with_chat_template(
    template_in: str, tmp_path: Path, corpus: list[str], built: dict[str, PreTrainedTokenizerFast]
) -> None:
    """A GGUF tokenizer saved as an HF directory loads back with its chat template, from
    ``chat_template.jinja`` or from ``tokenizer_config.json``."""
    src = built["smollm2"]
    src.save_pretrained(tmp_path)
    jinja = tmp_path / "chat_template.jinja"
    if template_in == "tokenizer_config":
        cfg_path = tmp_path / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["chat_template"] = jinja.read_text()
        cfg_path.write_text(json.dumps(cfg))
        jinja.unlink()
    tok = load_tokenizer(tmp_path)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        SMOLLM2_FRANCE
    )
    for s in corpus:
        assert tok(s)["input_ids"] == src(s)["input_ids"], s


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(TokenizerError, match=r"no tokenizer\.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{ broken")
    with pytest.raises(TokenizerError, match="cannot load") as info:
        load_tokenizer(tmp_path)
    assert "\n" not in str(info.value)
