"""models.pooling: pooling math on padded and packed layouts, configs, activations."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from models.pooling import (
    Activation,
    PoolerConfigError,
    PoolingType,
    apply_activation,
    classify_activation,
    l2_normalize_np,
    parse_override,
    pool_chunks,
    read_sentence_transformers_config,
    resolve_pooler_config,
    score_activation,
)
from serving.engine.pooling_params import PoolingParams
from serving.engine.records import PooledChunk
from serving.engine.request import EngineRequest, PoolAccumulator

LENGTHS = [3, 1, 5, 0]  # the last sequence is batch padding


def _packed(seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """A packed [T, D] step of LENGTHS plus 4 padding tokens full of garbage, its cu_lens, and
    each sequence's own rows."""
    rng = np.random.default_rng(seed)
    real = [rng.normal(size=(n, 5)).astype(np.float32) for n in LENGTHS]
    packed = np.concatenate([*real, np.full((4, 5), 7e5, np.float32)])
    cu = np.concatenate([[0], np.cumsum(LENGTHS)]).astype(np.int32)
    return packed, cu, real


def test_pool_chunks_first_last_total() -> None:
    packed, cu, real = _packed()
    first, last, total = (np.asarray(x) for x in pool_chunks(jnp.asarray(packed),
                                                              jnp.asarray(cu)))
    for s, rows in enumerate(real):
        if len(rows) == 0:  # an empty sequence pools to zeros, never to a neighbour's rows
            assert not first[s].any() and not last[s].any() and not total[s].any()
            continue
        np.testing.assert_allclose(first[s], rows[0], rtol=1e-6)
        np.testing.assert_allclose(last[s], rows[-1], rtol=1e-6)
        np.testing.assert_allclose(total[s], rows.sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", [PoolingType.MEAN, PoolingType.CLS, PoolingType.LAST])
def test_chunked_accumulation_equals_whole_prompt(kind: PoolingType) -> None:
    """A 9-token prompt pooled from chunks of 4, 4 and 1 tokens (three steps, each chunk packed
    with garbage neighbours) equals the pooling of the whole prompt."""
    rng = np.random.default_rng(3)
    prompt = rng.normal(size=(9, 5)).astype(np.float32)
    spec = EngineRequest("r", tuple(range(9)), 0.0, pooling=PoolingParams(), pooling_type=kind)
    acc = PoolAccumulator()
    for lo, hi in ((0, 4), (4, 8), (8, 9)):
        noise = rng.normal(size=(3, 5)).astype(np.float32) * 1e3
        step = np.concatenate([noise[:2], prompt[lo:hi], noise[2:]])  # ours is sequence 1
        cu = np.array([0, 2, 2 + hi - lo, 3 + hi - lo], np.int32)
        first, last, total = (np.asarray(x)[1] for x in pool_chunks(jnp.asarray(step),
                                                                   jnp.asarray(cu)))
        acc.add(PooledChunk(first, last, total))
    want = {PoolingType.MEAN: prompt.mean(0), PoolingType.CLS: prompt[0],
            PoolingType.LAST: prompt[-1]}[kind]
    np.testing.assert_allclose(acc.result(spec), want, rtol=1e-5, atol=1e-6)


def test_l2_normalize_np_zero_vector() -> None:
    out = l2_normalize_np(np.zeros((2, 3), np.float32))
    assert np.all(out == 0)


def _st_dir(tmp_path: Path, pooling: dict[str, object], modules: list[str]) -> Path:
    entries = []
    for i, kind in enumerate(modules):
        path = {"Pooling": "1_Pooling", "Normalize": "2_Normalize"}.get(kind, "")
        entries.append({"idx": i, "name": str(i), "path": path,
                        "type": f"sentence_transformers.models.{kind}"})
    (tmp_path / "modules.json").write_text(json.dumps(entries))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return tmp_path


def test_minilm_sentence_transformers_config(minilm_dir: Path) -> None:
    cfg = read_sentence_transformers_config(minilm_dir)
    assert cfg is not None
    assert (cfg.pooling_type, cfg.normalize) == (PoolingType.MEAN, True)


@pytest.mark.parametrize(("key", "kind"), [("pooling_mode_cls_token", PoolingType.CLS),
                                           ("pooling_mode_lasttoken", PoolingType.LAST)])
def test_st_modes_without_normalize(tmp_path: Path, key: str, kind: PoolingType) -> None:
    d = _st_dir(tmp_path, {key: True}, ["Transformer", "Pooling"])
    cfg = resolve_pooler_config(d)
    assert (cfg.pooling_type, cfg.normalize, cfg.source) == (kind, False, "sentence-transformers")


@pytest.mark.parametrize("pooling", [{"pooling_mode_max_tokens": True},
                                     {"pooling_mode_mean_tokens": True, "include_prompt": False},
                                     {"pooling_mode_mean_tokens": True,
                                      "pooling_mode_cls_token": True},
                                     {}])
def test_st_unsupported_pooling_is_refused(tmp_path: Path, pooling: dict[str, object]) -> None:
    d = _st_dir(tmp_path, pooling, ["Transformer", "Pooling"])
    with pytest.raises(PoolerConfigError):
        read_sentence_transformers_config(d)


def test_st_dense_module_is_refused(tmp_path: Path) -> None:
    d = _st_dir(tmp_path, {"pooling_mode_mean_tokens": True}, ["Transformer", "Pooling", "Dense"])
    with pytest.raises(PoolerConfigError, match="Dense"):
        read_sentence_transformers_config(d)


def test_defaults_and_override(tmp_path: Path) -> None:
    assert resolve_pooler_config(tmp_path).pooling_type == PoolingType.CLS
    dec = resolve_pooler_config(tmp_path, is_decoder=True)
    assert (dec.pooling_type, dec.normalize) == (PoolingType.LAST, True)
    over = resolve_pooler_config(tmp_path, override='{"pooling_type": "mean", "normalize": false}')
    assert (over.pooling_type, over.normalize, over.source) == (PoolingType.MEAN, False,
                                                                "override")
    assert parse_override(None) == {}
    with pytest.raises(PoolerConfigError, match="pooling_type"):
        parse_override({"pooling_type": "MAX"})
    with pytest.raises(PoolerConfigError, match="unknown"):
        parse_override({"softmax": True})
    with pytest.raises(PoolerConfigError, match="boolean"):
        parse_override({"normalize": "yes"})


def test_activation_rules() -> None:
    assert classify_activation(1, None) == Activation.SIGMOID
    assert classify_activation(3, None) == Activation.SOFTMAX
    assert classify_activation(3, "multi_label_classification") == Activation.SIGMOID
    assert classify_activation(1, "regression") == Activation.IDENTITY
    assert score_activation(1, None, "torch.nn.modules.linear.Identity") == Activation.IDENTITY
    assert score_activation(2, None, None) == Activation.SOFTMAX
    with pytest.raises(PoolerConfigError):
        score_activation(1, None, "torch.nn.modules.activation.Tanh")


def test_apply_activation_values() -> None:
    x = np.array([[-1000.0, 0.0, 1000.0]], np.float32)
    sig = apply_activation(x, Activation.SIGMOID)
    np.testing.assert_allclose(sig, [[0.0, 0.5, 1.0]], atol=1e-7)
    soft = apply_activation(np.array([[1.0, 2.0, 3.0]]), Activation.SOFTMAX)
    np.testing.assert_allclose(soft, np.exp([[1, 2, 3]]) / np.exp([1, 2, 3]).sum(), rtol=1e-6)
    assert apply_activation(x, Activation.IDENTITY) is not x
