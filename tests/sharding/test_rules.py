"""The rules table, the head plan and mesh specs: pure functions, no devices needed."""

from __future__ import annotations

import pytest
from jax.sharding import PartitionSpec as P

from sharding.mesh import MeshError, MeshShape, parse_mesh, resolve_shape
from sharding.rules import (
    KV_CACHE_AXES,
    ShardingError,
    partition_spec,
    plan_kv_heads,
    valid_tp_sizes,
)
from sharding.sharder import replicate_kv_heads

MESH4 = {"data": 1, "model": 4}


def test_partition_specs_follow_the_rules() -> None:
    assert partition_spec(("embed", "kv_heads", None, "head_dim"), (64, 4, 4, 8), MESH4) == \
        P(None, "model")
    assert partition_spec(("heads", "head_dim", "embed"), (16, 8, 64), MESH4) == P("model")
    assert partition_spec(("embed", None, "mlp"), (64, 2, 128), MESH4) == P(None, None, "model")
    assert partition_spec(("mlp", "embed"), (128, 64), MESH4) == P("model")
    assert partition_spec(("vocab", "embed"), (1000, 64), MESH4) == P("model")
    assert partition_spec(("norm",), (64,), MESH4) == P()
    assert partition_spec(KV_CACHE_AXES, (4, 100, 16, 8), MESH4) == P("model")
    # A vocabulary that does not divide stays replicated; heads must divide.
    assert partition_spec(("vocab", "embed"), (259, 64), MESH4) == P()
    with pytest.raises(ShardingError, match="kv_heads dimension 2"):
        partition_spec(KV_CACHE_AXES, (2, 100, 16, 8), MESH4)
    # One mesh size: everything replicated.
    assert partition_spec(("vocab", "embed"), (1000, 64), {"data": 1, "model": 1}) == P()


def test_head_plan_and_valid_sizes() -> None:
    assert valid_tp_sizes(9, 3) == [1, 3, 9]  # SmolLM2-135M
    assert valid_tp_sizes(8, 2) == [1, 2, 4, 8]  # the tiny test model
    assert valid_tp_sizes(4, 1) == [1, 2, 4]  # Gemma 3 270M
    assert plan_kv_heads(9, 3, 3) == 1
    assert plan_kv_heads(8, 2, 2) == 1
    assert plan_kv_heads(8, 2, 4) == 2 and plan_kv_heads(8, 2, 8) == 4
    with pytest.raises(ShardingError, match=r"tensor_parallel_size=2 .* valid sizes for this "
                                            r"model: 1, 3, 9"):
        plan_kv_heads(9, 3, 2)


def test_kv_head_replication_keeps_query_order() -> None:
    import numpy as np
    k, g, r, h = 2, 4, 2, 3
    x = np.arange(k * (g + 2) * h).reshape(1, k, g + 2, h)  # [D=1, K, G+2, H]
    y = replicate_kv_heads(x, 1, r)
    assert y.shape == (1, k * r, g // r + 2, h)
    q_old = x[:, :, :g].reshape(1, k * g, h)  # n = k * G + g
    q_new = y[:, :, :g // r].reshape(1, k * g, h)
    np.testing.assert_array_equal(q_new, q_old)
    for kk in range(k * r):  # new kv head kk carries old kv head kk // r
        np.testing.assert_array_equal(y[:, kk, g // r:], x[:, kk // r, g:])


def test_mesh_specs() -> None:
    assert parse_mesh("data=2,model=4") == MeshShape(2, 4)
    assert parse_mesh("model=8") == MeshShape(1, 8)
    assert parse_mesh("2x4") == MeshShape(2, 4)
    assert parse_mesh("tp=2, dp=3") == MeshShape(3, 2)
    assert resolve_shape(4, 1, None) == MeshShape(1, 4)
    assert resolve_shape(4, 2, "data=2,model=4") == MeshShape(2, 4)
    with pytest.raises(MeshError, match="bad --mesh"):
        parse_mesh("model:4")
    with pytest.raises(MeshError, match="tensor_parallel_size"):
        resolve_shape(2, 1, "model=4")
