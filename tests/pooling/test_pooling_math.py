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
    pool,
    pool_packed,
    read_sentence_transformers_config,
    resolve_pooler_config,
    score_activation,
)

LENGTHS = [3, 1, 5, 0]  # the last row is batch padding


def _batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(4, 6, 5)).astype(np.float32)  # [S, T, D]
    # Garbage in the padded positions must not leak into any result.
    for s, n in enumerate(LENGTHS):
        hidden[s, n:] = 1e6
    return hidden, np.array(LENGTHS, np.int32)


def _expected(hidden: np.ndarray, kind: PoolingType) -> np.ndarray:
    rows = []
    for s, n in enumerate(LENGTHS):
        if n == 0:
            rows.append(np.zeros(hidden.shape[-1], np.float32))
        elif kind == PoolingType.MEAN:
            rows.append(hidden[s, :n].mean(0))
        elif kind == PoolingType.CLS:
            rows.append(hidden[s, 0])
        else:
            rows.append(hidden[s, n - 1])
    return np.stack(rows)


@pytest.mark.parametrize("kind", [PoolingType.MEAN, PoolingType.CLS, PoolingType.LAST])
def test_pool_padded(kind: PoolingType) -> None:
    hidden, lengths = _batch()
    got = np.asarray(pool(jnp.asarray(hidden), jnp.asarray(lengths), kind))
    np.testing.assert_allclose(got, _expected(hidden, kind), rtol=1e-6, atol=1e-6)
    normed = np.asarray(pool(jnp.asarray(hidden), jnp.asarray(lengths), kind, normalize=True))
    assert np.all(np.isfinite(normed))
    np.testing.assert_allclose(np.linalg.norm(normed[:3], axis=1), 1.0, rtol=1e-6)
    assert np.all(normed[3] == 0)  # an empty row stays zero, not NaN


def test_pool_all_zeroes_padding() -> None:
    hidden, lengths = _batch()
    got = np.asarray(pool(jnp.asarray(hidden), jnp.asarray(lengths), PoolingType.ALL))
    for s, n in enumerate(LENGTHS):
        np.testing.assert_array_equal(got[s, :n], hidden[s, :n])
        assert np.all(got[s, n:] == 0)


@pytest.mark.parametrize("kind", [PoolingType.MEAN, PoolingType.CLS, PoolingType.LAST])
def test_pool_packed_matches_padded(kind: PoolingType) -> None:
    hidden, _ = _batch(1)
    real = [hidden[s, :n] for s, n in enumerate(LENGTHS)]
    packed = np.concatenate([*real, np.full((4, 5), 7e5, np.float32)])  # 4 padding tokens
    cu = np.concatenate([[0], np.cumsum(LENGTHS)]).astype(np.int32)
    got = np.asarray(pool_packed(jnp.asarray(packed), jnp.asarray(cu), kind))
    np.testing.assert_allclose(got, _expected(hidden, kind), rtol=1e-6, atol=1e-6)


def test_pool_packed_rejects_all() -> None:
    with pytest.raises(ValueError, match="ALL"):
        pool_packed(jnp.zeros((4, 2)), jnp.array([0, 4]), PoolingType.ALL)


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
