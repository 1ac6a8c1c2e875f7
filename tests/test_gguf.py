"""GGUF model source (models/gguf.py): config, tensor names/layout, dequantization, errors.

Real files: SmolLM2-135M-Instruct (Q4_1, llama) and Gemma 3 270M (Q4_K_M, gemma3) from the asset
cache. Synthetic files: tiny random models written with ``gguf.GGUFWriter`` in tmp_path, whose
weights we know, so the loader's layout transforms (Q/K un-permute, Gemma norm shift, llama3 rope
factors) are checked against the weights we started from.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGUFWriter
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from models import assets
from models.gguf import (
    SUPPORTED_QUANT_TYPES,
    GGUFError,
    load_gguf,
    load_gguf_config,
    permute_rows,
    read_header,
)

# ----------------------------------------------------------------------------------------------
# A tiny llama-family GGUF with known weights
# ----------------------------------------------------------------------------------------------

D, N, K, H, F, L = 64, 4, 2, 16, 96, 2  # model dim, q heads, kv heads, head dim, ffn, layers


def _bytes_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: 256 printable characters, one per byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]


def _tiny_tokenizer(w: GGUFWriter) -> int:
    """A byte-level BPE vocabulary: 256 bytes, two merges, three control tokens."""
    tokens = [*_bytes_alphabet(), "Ġt", "Ġth", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 3) + [3, 3, 3]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["Ġ t", "Ġt h"])
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_add_bos_token(False)
    w.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    )
    return len(tokens)


def _put(w: GGUFWriter, name: str, x: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Store ``x`` (numpy order) as ``qtype``; return what a loader should read back.

    gguf-py cannot quantize k-quants (or IQ types); for those we store random blocks instead,
    with every byte < 0x78 so no f16 scale inside a block is inf/nan, and expect what gguf's
    dequantize makes of them.
    """
    if qtype == Q.F32:
        w.add_tensor(name, x.astype(np.float32))
        return x.astype(np.float32)
    if qtype == Q.F16:
        w.add_tensor(name, x.astype(np.float16))
        return x.astype(np.float16).astype(np.float32)
    try:
        q = quantize(x.astype(np.float32), qtype)
    except NotImplementedError:
        block, type_size = GGML_QUANT_SIZES[qtype]
        rows, cols = x.shape
        q = rng.integers(0, 0x78, size=(rows, cols // block * type_size), dtype=np.uint8)
    w.add_tensor(name, q, raw_dtype=qtype)
    if qtype not in SUPPORTED_QUANT_TYPES:
        return np.zeros(x.shape, np.float32)  # never read: loading must fail
    return dequantize(q, qtype)


def write_tiny(
    path: Path,
    arch: str = "llama",
    *,
    types: dict[str, Q] | None = None,
    permute: bool = True,
    tied: bool = False,
    rope_freqs: np.ndarray | None = None,
    orig_ctx: int | None = None,
    ffn: int = F,
    bias: bool = False,
    extra: dict[str, np.ndarray] | None = None,
    seed: int = 0,
    attention_scale: float | None = None,
) -> dict[str, np.ndarray]:
    """Write a random tiny model; return ``{hf_name: expected float32 array}``.

    ``types`` maps a GGUF name suffix (e.g. "attn_k") to its storage type; the default mixes
    F32, F16, Q8_0 and Q4_0. With ``permute`` the Q/K rows are stored the way llama.cpp's
    converter stores them, and the returned expectation is the HF (un-permuted) layout.
    """
    rng = np.random.default_rng(seed)
    types = {
        "attn_q": Q.F32, "attn_k": Q.Q8_0, "attn_v": Q.Q4_0, "attn_output": Q.F16,
        "ffn_gate": Q.Q8_0, "ffn_up": Q.Q4_0, "ffn_down": Q.F32,
    } | (types or {})  # fmt: skip
    w = GGUFWriter(str(path), arch)
    w.add_block_count(L)
    w.add_context_length(256)
    w.add_embedding_length(D)
    w.add_feed_forward_length(ffn)
    w.add_head_count(N)
    w.add_head_count_kv(K)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    if orig_ctx is not None:
        w.add_rope_scaling_orig_ctx_len(orig_ctx)
    if arch in ("gemma3", "qwen3"):
        w.add_key_length(H)
        w.add_sliding_window(8)
    if attention_scale is not None:
        w.add_attention_scale(attention_scale)
    vocab = _tiny_tokenizer(w)
    expected: dict[str, np.ndarray] = {}
    norm_shift = 1.0 if arch == "gemma3" else 0.0

    def norm(gguf_name: str, hf_name: str, size: int) -> None:
        x = rng.normal(1.0, 0.1, size).astype(np.float32)
        expected[hf_name] = _put(w, gguf_name, x + np.float32(norm_shift), Q.F32, rng) - (
            np.float32(norm_shift)
        )

    expected["model.embed_tokens.weight"] = _put(
        w, "token_embd.weight", rng.normal(size=(vocab, D)), Q.Q8_0, rng
    )
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for i in range(L):
        shapes = {
            "attn_q": (N * H, D), "attn_k": (K * H, D), "attn_v": (K * H, D),
            "attn_output": (D, N * H), "ffn_gate": (ffn, D), "ffn_up": (ffn, D),
            "ffn_down": (D, ffn),
        }  # fmt: skip
        hf = {
            "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
        }  # fmt: skip
        for part, shape in shapes.items():
            x = rng.normal(size=shape).astype(np.float32)
            hf_name = f"model.layers.{i}.{hf[part]}.weight"
            if permute and part in ("attn_q", "attn_k"):
                stored = permute_rows(x, N if part == "attn_q" else K)
                got = _put(w, f"blk.{i}.{part}.weight", stored, types[part], rng)
                # Row quantization commutes with a row permutation, so this is exact.
                heads = N if part == "attn_q" else K
                inv = np.argsort(permute_rows(np.arange(shape[0]), heads))
                expected[hf_name] = got[inv]
            else:
                expected[hf_name] = _put(w, f"blk.{i}.{part}.weight", x, types[part], rng)
        if bias:  # stored after the same row permutation as the weight
            for part, rows in (("attn_q", N * H), ("attn_k", K * H), ("attn_v", K * H)):
                b = rng.normal(size=rows).astype(np.float32)
                heads = {"attn_q": N, "attn_k": K}.get(part)
                stored = permute_rows(b, heads) if permute and heads else b
                w.add_tensor(f"blk.{i}.{part}.bias", stored)
                expected[f"model.layers.{i}.{hf[part]}.bias"] = b
        norm(f"blk.{i}.attn_norm.weight", f"model.layers.{i}.input_layernorm.weight", D)
        if arch == "qwen3":
            norm(f"blk.{i}.attn_q_norm.weight", f"model.layers.{i}.self_attn.q_norm.weight", H)
            norm(f"blk.{i}.attn_k_norm.weight", f"model.layers.{i}.self_attn.k_norm.weight", H)
        if arch == "gemma3":
            norm(f"blk.{i}.post_attention_norm.weight",
                 f"model.layers.{i}.post_attention_layernorm.weight", D)  # fmt: skip
            norm(f"blk.{i}.ffn_norm.weight",
                 f"model.layers.{i}.pre_feedforward_layernorm.weight", D)  # fmt: skip
            norm(f"blk.{i}.post_ffw_norm.weight",
                 f"model.layers.{i}.post_feedforward_layernorm.weight", D)  # fmt: skip
            norm(f"blk.{i}.attn_q_norm.weight", f"model.layers.{i}.self_attn.q_norm.weight", H)
            norm(f"blk.{i}.attn_k_norm.weight", f"model.layers.{i}.self_attn.k_norm.weight", H)
        else:
            norm(f"blk.{i}.ffn_norm.weight",
                 f"model.layers.{i}.post_attention_layernorm.weight", D)  # fmt: skip
    norm("output_norm.weight", "model.norm.weight", D)
    for name, x in (extra or {}).items():
        w.add_tensor(name, x)
    if not tied:
        expected["lm_head.weight"] = _put(
            w, "output.weight", rng.normal(size=(vocab, D)), Q.Q4_0, rng
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def _load_all(path: Path) -> tuple[Any, dict[str, np.ndarray]]:
    model = load_gguf(path, tokenizer_cache=False, progress=False)
    return model, dict(model.tensors(progress=False))


# ----------------------------------------------------------------------------------------------
# Synthetic files
# ----------------------------------------------------------------------------------------------


def test_tiny_llama_round_trip(tmp_path: Path) -> None:
    expected = write_tiny(tmp_path / "tiny.gguf")
    model, got = _load_all(tmp_path / "tiny.gguf")
    cfg = model.hf_config
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (D, N, K)
    assert (cfg["head_dim"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (H, F, L)
    assert cfg["tie_word_embeddings"] is False and cfg["rope_scaling"] is None
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 10000.0
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        assert got[name].dtype == np.float32 and got[name].flags.c_contiguous, name
        assert got[name].flags.writeable, name
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    assert model.tensor_shapes() == {k: v.shape for k, v in expected.items()}
    assert model.num_tensors == len(expected)


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q4_1, Q.Q5_0, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_tiny_llama_other_quant_types(tmp_path: Path, qtype: Q) -> None:
    """Every supported storage type; on the permuted Q weight where its blocks fit (64 wide)."""
    if GGML_QUANT_SIZES[qtype][0] > D:  # k-quants: 256-wide blocks, so a 256-wide ffn_down
        expected = write_tiny(tmp_path / "t.gguf", ffn=256, types={"ffn_down": qtype})
    else:
        expected = write_tiny(tmp_path / "t.gguf", types={"attn_q": qtype, "ffn_down": qtype})
    _, got = _load_all(tmp_path / "t.gguf")
    for name, want in expected.items():
        assert np.isfinite(got[name]).all(), name
        np.testing.assert_array_equal(got[name], want, err_msg=name)


def test_unpermute_matches_llama_cpp_rope() -> None:
    """HF rotate_half rope on un-permuted rows == llama.cpp pairwise rope on permuted rows.

    This pins the direction of the permutation, not just that un-permute inverts permute.
    """
    rng = np.random.default_rng(0)
    n_head, hd, pos = 3, 8, 5
    w_hf = rng.normal(size=(n_head * hd, D))
    x = rng.normal(size=D)
    inv_freq = 1.0 / 10000 ** (np.arange(0, hd, 2) / hd)
    ang = pos * inv_freq
    cos, sin = np.cos(ang), np.sin(ang)

    q = (w_hf @ x).reshape(n_head, hd)  # HF: halves [x0..x3 | x4..x7] rotate together
    q1, q2 = q[:, : hd // 2], q[:, hd // 2 :]
    hf_out = np.concatenate([q1 * cos - q2 * sin, q2 * cos + q1 * sin], axis=1)

    qp = (permute_rows(w_hf, n_head) @ x).reshape(n_head, hd // 2, 2)  # llama.cpp: pairs
    a, b = qp[..., 0], qp[..., 1]
    cpp_out = np.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(n_head, hd)
    # the same vectors, in the two layouts
    np.testing.assert_allclose(permute_rows(hf_out.reshape(-1), n_head).reshape(n_head, hd),
                               cpp_out, atol=1e-12)  # fmt: skip


def test_tiny_gemma3_norm_shift_and_no_permute(tmp_path: Path) -> None:
    expected = write_tiny(tmp_path / "g.gguf", "gemma3", permute=False, tied=True,
                          attention_scale=H**-0.5)
    model, got = _load_all(tmp_path / "g.gguf")
    cfg = model.hf_config
    assert cfg["query_pre_attn_scalar"] == H
    assert cfg["model_type"] == "gemma3_text" and cfg["architectures"] == ["Gemma3ForCausalLM"]
    assert cfg["tie_word_embeddings"] is True and "lm_head.weight" not in got
    assert cfg["sliding_window"] == 8 and cfg["head_dim"] == H
    assert cfg["layer_types"] == ["sliding_attention", "sliding_attention"]
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        # norms were stored as w + 1 and come back as w (float rounding of the +1/-1 only)
        np.testing.assert_allclose(got[name], want, rtol=0, atol=1e-6, err_msg=name)
    assert abs(float(got["model.norm.weight"].mean()) - 1.0) < 0.1  # stored mean was ~2


def test_gemma3_query_pre_attn_scalar_is_what_the_file_states(tmp_path: Path) -> None:
    """{arch}.attention.scale gives query_pre_attn_scalar = 1/scale^2, whatever the shape; a file
    without it is refused unless head_dim is the 256 on which transformers and llama.cpp agree
    (the real 270M file, without the key, reads 256: test_gemma3_config)."""
    write_tiny(tmp_path / "s.gguf", "gemma3", permute=False, attention_scale=168**-0.5)
    assert load_gguf_config(tmp_path / "s.gguf")["query_pre_attn_scalar"] == pytest.approx(168)
    write_tiny(tmp_path / "n.gguf", "gemma3", permute=False)
    with pytest.raises(GGUFError) as info:
        load_gguf_config(tmp_path / "n.gguf")
    msg = str(info.value)
    assert "gemma3.attention.scale" in msg and "head_dim 16" in msg and "\n" not in msg


def _llama3_factors_reference(
    head_dim: int, base: float, factor: float, low: float, high: float, old_ctx: int
) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's rope_freqs for rope_type llama3, written out plainly."""
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / base ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path: Path) -> None:
    # head_dim 16, base 1e4, original context 64: two of the eight frequencies fall in the
    # smooth band between the high- and low-frequency cut-offs, enough to fit low/high.
    freqs = _llama3_factors_reference(H, 10000.0, 8.0, 1.0, 4.0, 64)
    assert ((freqs > 1) & (freqs < 8)).sum() >= 2
    write_tiny(tmp_path / "r.gguf", rope_freqs=freqs, orig_ctx=64)
    model, got = _load_all(tmp_path / "r.gguf")
    scaling = model.hf_config["rope_scaling"]
    assert scaling == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }  # fmt: skip
    assert model.hf_config["rope_parameters"]["rope_type"] == "llama3"
    assert not any("rope_freqs" in n for n in got)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_tiny_qwen_and_biases(tmp_path: Path, arch: str) -> None:
    """qwen2: q/k/v biases, no permutation. qwen3: q/k norms, no permutation, no norm shift.
    llama with biases: the biases are un-permuted like their weights."""
    permute = arch == "llama"
    expected = write_tiny(tmp_path / "q.gguf", arch, permute=permute, bias=arch != "qwen3")
    model, got = _load_all(tmp_path / "q.gguf")
    cfg = model.hf_config
    assert cfg["model_type"] == arch
    assert cfg["architectures"] == [{"qwen2": "Qwen2", "qwen3": "Qwen3", "llama": "Llama"}[arch]
                                    + "ForCausalLM"]  # fmt: skip
    assert cfg["attention_bias"] is (arch != "qwen3")
    assert cfg["use_qk_norm"] is (arch == "qwen3")
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)


def test_directory_with_one_gguf(tmp_path: Path) -> None:
    write_tiny(tmp_path / "m.gguf")
    (tmp_path / "README.md").write_text("not a model")
    model = load_gguf(tmp_path, tokenizer_cache=False, progress=False)
    assert model.path == tmp_path / "m.gguf"


# ----------------------------------------------------------------------------------------------
# Errors: one clear line each
# ----------------------------------------------------------------------------------------------


def _error(path: Path | str) -> str:
    with pytest.raises(GGUFError) as info:
        load_gguf(path, tokenizer_cache=False, progress=False)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def test_error_missing_path(tmp_path: Path) -> None:
    assert "not found" in _error(tmp_path / "nope.gguf")


def test_error_directory_without_or_with_many(tmp_path: Path) -> None:
    assert "no .gguf file" in _error(tmp_path)
    write_tiny(tmp_path / "a.gguf")
    shutil.copy(tmp_path / "a.gguf", tmp_path / "b.gguf")
    msg = _error(tmp_path)
    assert "2 .gguf files" in msg and "a.gguf" in msg and "b.gguf" in msg


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.01, 30])
def test_error_truncated(tmp_path: Path, keep: float) -> None:
    """Cut in the tensor data (0.5, 0.999), in the metadata (0.01), or just after the magic."""
    write_tiny(tmp_path / "full.gguf")
    data = (tmp_path / "full.gguf").read_bytes()
    n = int(len(data) * keep) if keep < 1 else int(keep)
    (tmp_path / "cut.gguf").write_bytes(data[:n])
    msg = _error(tmp_path / "cut.gguf")
    assert "truncated" in msg and "cut.gguf" in msg, msg


@pytest.mark.parametrize("content", [b"", b"hello", b"\x00" * 1000, b"PK\x03\x04" + b"z" * 4096])
def test_error_not_gguf(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "x.gguf").write_bytes(content)
    assert "not a GGUF file" in _error(tmp_path / "x.gguf")


def test_error_corrupt_header(tmp_path: Path) -> None:
    write_tiny(tmp_path / "ok.gguf")
    data = bytearray((tmp_path / "ok.gguf").read_bytes())
    data[16:24] = (2**40).to_bytes(8, "little")  # absurd metadata count
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    assert "corrupt" in _error(tmp_path / "bad.gguf")
    data = bytearray((tmp_path / "ok.gguf").read_bytes())
    data[4:8] = (7).to_bytes(4, "little")  # unknown version
    (tmp_path / "v7.gguf").write_bytes(bytes(data))
    assert "version 7" in _error(tmp_path / "v7.gguf")


def test_error_unknown_value_type(tmp_path: Path) -> None:
    write_tiny(tmp_path / "ok.gguf")
    data = bytearray((tmp_path / "ok.gguf").read_bytes())
    key = b"general.architecture"  # the writer's first key: its value type follows the name
    at = 24 + 8 + len(key)
    assert data[32:at] == key
    data[at : at + 4] = (99).to_bytes(4, "little")
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    assert "unknown metadata value type 99" in _error(tmp_path / "bad.gguf")


def test_error_unsupported_architecture(tmp_path: Path) -> None:
    write_tiny(tmp_path / "mamba.gguf", "mamba", permute=False)
    msg = _error(tmp_path / "mamba.gguf")
    assert "unsupported GGUF architecture 'mamba'" in msg
    assert "llama" in msg and "gemma3" in msg


@pytest.mark.parametrize("qtype", [Q.IQ2_XXS, Q.TQ1_0, Q.Q2_K])
def test_error_unsupported_quant_type(tmp_path: Path, qtype: Q) -> None:
    assert qtype not in SUPPORTED_QUANT_TYPES
    write_tiny(tmp_path / "q.gguf", ffn=256, types={"ffn_down": qtype})
    msg = _error(tmp_path / "q.gguf")
    assert "'blk.0.ffn_down.weight'" in msg and qtype.name in msg and "Q4_K" in msg, msg


def test_error_unknown_tensor_name(tmp_path: Path) -> None:
    write_tiny(tmp_path / "u.gguf", extra={"blk.0.mystery.weight": np.zeros((4, 32), np.float32)})
    assert "'blk.0.mystery.weight'" in _error(tmp_path / "u.gguf")


# ----------------------------------------------------------------------------------------------
# Real files
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    return assets.fetch("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def smollm2_reader(smollm2_path: Path) -> Any:
    from gguf import GGUFReader

    return GGUFReader(smollm2_path)


@pytest.fixture(scope="module")
def gemma3_path() -> Path:
    return assets.fetch("gemma3-270m")


def test_smollm2_config(smollm2_path: Path) -> None:
    cfg = load_gguf_config(smollm2_path)
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576
    assert cfg["intermediate_size"] == 1536
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert cfg["rope_theta"] == 100000.0 and cfg["rope_scaling"] is None
    assert cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"] is True
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["max_position_embeddings"] == 8192
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    assert cfg["attention_bias"] is False and cfg["use_qk_norm"] is False


def test_smollm2_tensors_complete(smollm2_path: Path) -> None:
    model = load_gguf(smollm2_path, progress=False)
    assert model.generation_config == {"bos_token_id": 1, "eos_token_id": [2], "pad_token_id": 2}
    shapes = {name: w.shape for name, w in model.tensors(progress=False)}
    want = {"model.embed_tokens.weight": (49152, 576), "model.norm.weight": (576,)}
    for i in range(30):
        p = f"model.layers.{i}."
        want |= {
            p + "self_attn.q_proj.weight": (576, 576), p + "self_attn.k_proj.weight": (192, 576),
            p + "self_attn.v_proj.weight": (192, 576), p + "self_attn.o_proj.weight": (576, 576),
            p + "mlp.gate_proj.weight": (1536, 576), p + "mlp.up_proj.weight": (1536, 576),
            p + "mlp.down_proj.weight": (576, 1536), p + "input_layernorm.weight": (576,),
            p + "post_attention_layernorm.weight": (576,),
        }  # fmt: skip
    assert shapes == want  # 272 tensors, no lm_head (tied)


def test_smollm2_tensor_values(smollm2_path: Path, smollm2_reader: Any) -> None:
    """Spot values: the Q4_1 dequant matches gguf's own, and the un-permute is applied to q/k."""
    model = load_gguf(smollm2_path, progress=False)
    names = {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight",
             "model.layers.0.input_layernorm.weight"}  # fmt: skip
    got = dict(model.tensors(progress=False, only=names))
    assert set(got) == names
    raw = {t.name: t for t in smollm2_reader.tensors}
    v = raw["blk.0.attn_v.weight"]
    np.testing.assert_array_equal(
        got["model.layers.0.self_attn.v_proj.weight"], dequantize(v.data, v.tensor_type)
    )
    q = raw["blk.0.attn_q.weight"]
    q_gguf = dequantize(q.data, q.tensor_type)
    np.testing.assert_array_equal(permute_rows(got["model.layers.0.self_attn.q_proj.weight"], 9),
                                  q_gguf)  # fmt: skip
    assert not np.array_equal(got["model.layers.0.self_attn.q_proj.weight"], q_gguf)
    norm = raw["blk.0.attn_norm.weight"]
    np.testing.assert_array_equal(got["model.layers.0.input_layernorm.weight"], norm.data)


def test_header_matches_gguf_reader(smollm2_path: Path, smollm2_reader: Any) -> None:
    """Our header parser sees what gguf's reader sees."""
    h = read_header(smollm2_path)
    reader = smollm2_reader
    assert [t.name for t in h.tensors] == [t.name for t in reader.tensors]
    assert [t.shape for t in h.tensors] == [tuple(int(d) for d in reversed(t.shape)) for t in
                                            reader.tensors]  # fmt: skip
    assert [t.offset for t in h.tensors] == [int(t.data_offset) for t in reader.tensors]
    for key in ("tokenizer.ggml.merges", "tokenizer.ggml.tokens", "tokenizer.chat_template",
                "llama.attention.layer_norm_rms_epsilon", "tokenizer.ggml.token_type"):  # fmt: skip
        assert h.metadata[key] == reader.fields[key].contents(), key


def test_every_metadata_value_type_reads_as_gguf_reader_reads_it(tmp_path: Path) -> None:
    """The header walk against gguf's reader, one key per GGUFValueType (and per array kind)."""
    from gguf import GGUFReader, GGUFValueType

    path = tmp_path / "types.gguf"
    w = GGUFWriter(str(path), "llama")
    values: dict[str, tuple[Any, Any]] = {  # key: (writer method, value)
        "t.u8": (w.add_uint8, 200), "t.i8": (w.add_int8, -5), "t.u16": (w.add_uint16, 60000),
        "t.i16": (w.add_int16, -300), "t.u32": (w.add_uint32, 4_000_000_000),
        "t.i32": (w.add_int32, -7), "t.f32": (w.add_float32, 0.1), "t.u64": (w.add_uint64, 2**63),
        "t.i64": (w.add_int64, -(2**40)), "t.f64": (w.add_float64, 0.1),
        "t.bool": (w.add_bool, True), "t.str": (w.add_string, "héllo"),
        "t.ints": (w.add_array, [1, 2, 3]), "t.floats": (w.add_array, [0.5, 1.5]),
        "t.strs": (w.add_array, ["a", "bc"]), "t.nested": (w.add_array, [[1, 2], [3]]),
    }  # fmt: skip
    for key, (add, v) in values.items():
        add(key, v)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours, reader = read_header(path).metadata, GGUFReader(path)
    seen = {t for k in values for t in reader.fields[k].types}
    assert seen == set(GGUFValueType)
    for key in values:
        if key != "t.nested":  # the reader's contents() flattens nested arrays
            assert ours[key] == reader.fields[key].contents(), key
    assert ours["t.nested"] == [[1, 2], [3]]


def test_gemma3_config(gemma3_path: Path) -> None:
    cfg = load_gguf_config(gemma3_path)
    assert cfg["model_type"] == "gemma3_text" and cfg["architectures"] == ["Gemma3ForCausalLM"]
    assert cfg["num_hidden_layers"] == 18 and cfg["hidden_size"] == 640
    assert cfg["intermediate_size"] == 2048
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 1, 256)
    assert cfg["sliding_window"] == 512 and cfg["sliding_window_pattern"] == 6
    assert cfg["layer_types"] == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert cfg["rope_theta"] == 1e6 and cfg["rope_local_base_freq"] == 10000.0
    assert cfg["query_pre_attn_scalar"] == 256
    assert cfg["final_logit_softcapping"] is None and cfg["attn_logit_softcapping"] is None
    assert cfg["vocab_size"] == 262144 and cfg["tie_word_embeddings"] is True
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["max_position_embeddings"] == 32768
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (2, 1, 0)
    assert cfg["hidden_activation"] == "gelu_pytorch_tanh"


def test_gemma3_tensor_names_and_norms(gemma3_path: Path) -> None:
    model = load_gguf(gemma3_path, progress=False)
    assert model.generation_config["eos_token_id"] == [1, 106]  # <eos>, <end_of_turn>
    shapes = model.tensor_shapes()
    assert len(shapes) == 236 and "lm_head.weight" not in shapes
    p = "model.layers.17."
    assert shapes[p + "self_attn.q_proj.weight"] == (1024, 640)
    assert shapes[p + "self_attn.k_proj.weight"] == (256, 640)
    assert shapes[p + "self_attn.q_norm.weight"] == (256,)
    for n in ("pre_feedforward_layernorm", "post_feedforward_layernorm",
              "post_attention_layernorm", "input_layernorm"):  # fmt: skip
        assert shapes[p + n + ".weight"] == (640,)
    # Norms are stored as w + 1 (reference: blk.0.attn_norm mean 13.48 stored, 12.48 in HF).
    got = dict(model.tensors(progress=False, only={"model.layers.0.input_layernorm.weight"}))
    assert abs(float(got["model.layers.0.input_layernorm.weight"].mean()) - 12.48) < 0.01


@pytest.mark.slow
def test_gemma3_all_tensors_dequantize(gemma3_path: Path) -> None:
    model = load_gguf(gemma3_path, progress=False)
    n = 0
    for name, w in model.tensors(progress=False):
        assert w.dtype == np.float32 and np.isfinite(w).all(), name
        n += w.size
    assert n == 268_098_176
