"""Each Pallas kernel lowers for its platform from this CPU host, over the configurations the
kernel tests run in interpret mode (``tests/ops``), and the exported module is the kernel:
one custom call of the platform, nothing that runs on the host, the caches aliased through the
KV write. ``-m slow``: the kernel tests' full products.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import pytest

from ops import pallas_gpu, pallas_tpu
from tests.ops import test_pallas_gpu as gpu_cases
from tests.ops import test_pallas_tpu as tpu_cases
from tests.ops.paged_cases import SCENARIOS, Geometry
from tests.platforms.exports import assert_clean, export_for, module_facts

I32 = jnp.int32


def _geometry(cfg: tuple, num_kv: int) -> Geometry:
    g, h, b, dt = cfg[:4]
    return Geometry.fitting(SCENARIOS, num_kv=num_kv, group=g, head=h, page=b, dtype=dt)


def _attention_args(geo: Geometry) -> tuple[jax.ShapeDtypeStruct, ...]:
    spec = jax.ShapeDtypeStruct
    cache = spec((geo.num_kv, geo.num_pages, geo.page, geo.head), geo.dtype)
    return (spec((geo.num_tokens, geo.num_kv * geo.group, geo.head), geo.dtype), cache, cache,
            spec((geo.num_seqs, geo.width), I32), spec((geo.num_seqs,), I32),
            spec((geo.num_seqs + 1,), I32))


def _write_args(geo: Geometry) -> tuple[jax.ShapeDtypeStruct, ...]:
    spec = jax.ShapeDtypeStruct
    cache = spec((geo.num_kv, geo.num_pages, geo.page, geo.head), geo.dtype)
    new = spec((geo.num_tokens, geo.num_kv, geo.head), geo.dtype)
    return cache, cache, new, new, spec((geo.num_tokens,), I32)


def _check(platform: str, attention: Any, write_kv: Any, geo: Geometry) -> None:
    cache = [(geo.num_kv, geo.num_pages, geo.page, geo.head)]
    exp = export_for(platform, attention, _attention_args(geo))
    # The attention reads the caches: nothing of their shape may be made anew.
    assert_clean(module_facts(exp, cache), platform, kernels=1)
    exp = export_for(platform, write_kv, _write_args(geo), donate=(0, 1))
    assert_clean(module_facts(exp, cache), platform, kernels=1, aliased_args=(0, 1))


def _gpu(cfg: tuple) -> None:
    h, w, c, bq, bkv = cfg[1], *cfg[4:]
    attention = functools.partial(pallas_gpu.ragged_paged_attention, sm_scale=h ** -0.5,
                                  sliding_window=w, soft_cap=c, block_q=bq, block_kv=bkv)
    _check("cuda", attention, pallas_gpu.write_kv, _geometry(cfg, gpu_cases.NUM_KV))


def _tpu(cfg: tuple) -> None:
    h, w, c, bq, ppb = cfg[1], *cfg[4:]
    attention = functools.partial(pallas_tpu.ragged_paged_attention, sm_scale=h ** -0.5,
                                  sliding_window=w, soft_cap=c, block_q=bq, pages_per_block=ppb)
    _check("tpu", attention, pallas_tpu.write_kv, _geometry(cfg, tpu_cases.NUM_KV))


@pytest.mark.parametrize("cfg", gpu_cases.DEFAULT_CONFIGS, ids=gpu_cases._label)
def test_gpu_kernels_lower_for_cuda(cfg: tuple) -> None:
    _gpu(cfg)


@pytest.mark.parametrize("cfg", tpu_cases.DEFAULT_CONFIGS, ids=tpu_cases._label)
def test_tpu_kernels_lower_for_tpu_on_a_cpu_host(cfg: tuple) -> None:
    """No abstract TPU mesh, no chip named: the lowering must not ask this host for its chip
    (``ops/README.md``, "TPU lowering on a CPU host")."""
    _tpu(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("cfg", gpu_cases.SLOW_CONFIGS, ids=gpu_cases._label)
def test_gpu_kernels_lower_for_cuda_full_product(cfg: tuple) -> None:
    _gpu(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("cfg", tpu_cases.SLOW_CONFIGS, ids=tpu_cases._label)
def test_tpu_kernels_lower_for_tpu_full_product(cfg: tuple) -> None:
    _tpu(cfg)
