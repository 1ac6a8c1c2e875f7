"""The single switch point: CPU uses the reference, forced kernels agree with it."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.registry import ModelLoadError
from ops import attention, backend, pallas_gpu, pallas_tpu
from serving.engine.config import EngineArgs
from serving.engine.engine import LLMEngine
from tests.ops.paged_cases import SCENARIOS, Geometry, assert_matches_reference, build_case


def test_cpu_reference_pairs_the_dim_major_layout(caplog: pytest.LogCaptureFixture) -> None:
    assert jax.default_backend() == "cpu"
    with caplog.at_level(logging.INFO, logger="xlaserve.ops"):
        attn, write, desc = backend.get_attention_fn("reference")
    # The reference ops, paired on the CPU key-page layout.
    assert attn.func is attention.ragged_paged_attention_reference  # type: ignore[attr-defined]
    assert write.func is attention.write_kv  # type: ignore[attr-defined]
    assert attn.keywords == write.keywords == {"dim_major_keys": True}  # type: ignore[attr-defined]
    assert "reference" in desc and "dim-major" in desc
    assert any("attention backend: reference" in r.getMessage() for r in caplog.records)
    assert backend.get_linear_fn("reference") is None  # the model keeps its einsums


@pytest.mark.parametrize("platform, module", [("gpu", pallas_gpu), ("tpu", pallas_tpu)])
def test_auto_picks_the_platform_kernel(platform: str, module: object) -> None:
    chosen = backend.get_attention_fn("auto", platform=platform)
    assert chosen.attention is module.ragged_paged_attention  # type: ignore[attr-defined]
    assert chosen.write_kv is module.write_kv  # type: ignore[attr-defined]
    forced = backend.get_attention_fn("reference", platform=platform).attention
    assert forced.func is attention.ragged_paged_attention_reference  # type: ignore[attr-defined]
    assert forced.keywords == {"dim_major_keys": False}  # type: ignore[attr-defined]


def test_pallas_without_a_kernel_platform_and_unknown_names_are_errors() -> None:
    with pytest.raises(ValueError, match="pallas-interpret"):
        backend.get_attention_fn("pallas")  # this machine is a CPU
    with pytest.raises(ValueError, match="must be one of"):
        backend.get_attention_fn("triton")


def test_forced_kernel_in_interpret_mode_matches_reference_on_cpu() -> None:
    """The whole switch path on CPU: write this step's K/V, then attend, with both backends."""
    ref_attn, ref_write, _ = backend.get_attention_fn("reference")
    attn, write, desc = backend.get_attention_fn("pallas-interpret")
    assert "interpret" in desc
    geo = Geometry.fitting(SCENARIOS, num_kv=2, group=4, head=64, page=16, dtype=jnp.bfloat16)
    case = build_case(geo, SCENARIOS["mixed"], seed=4)
    # This step's new K/V go to the last q_len slots of each sequence (here: rewritten).
    rng = np.random.default_rng(0)
    num_tokens = case.q.shape[0]
    new_k = jnp.asarray(rng.standard_normal((num_tokens, 2, 64)), jnp.bfloat16)
    new_v = jnp.asarray(rng.standard_normal((num_tokens, 2, 64)), jnp.bfloat16)
    slots = np.full(num_tokens, -1, np.int32)
    cu, kv, pt = (np.asarray(a) for a in (case.cu_q_lens, case.kv_lens, case.page_table))
    for s in range(len(kv)):
        for t in range(cu[s], cu[s + 1]):
            pos = kv[s] - (cu[s + 1] - cu[s]) + (t - cu[s])
            slots[t] = pt[s, pos // 16] * 16 + pos % 16
    slot_mapping = jnp.asarray(slots)
    kw = dict(sm_scale=0.125, sliding_window=None, soft_cap=None)

    # The CPU reference keeps key pages dimension-major: give it the case's keys that way.
    rk, rv = ref_write(attention.keys_dim_major(case.k_cache), case.v_cache, new_k, new_v,
                       slot_mapping)
    ref = ref_attn(case.q, rk, rv, case.page_table, case.kv_lens, case.cu_q_lens, **kw)
    kk, kv_ = write(jnp.array(case.k_cache), jnp.array(case.v_cache), new_k, new_v,
                    slot_mapping)
    out = attn(case.q, kk, kv_, case.page_table, case.kv_lens, case.cu_q_lens, **kw)
    np.testing.assert_array_equal(np.asarray(attention.keys_dim_major(kk), np.float32),
                                  np.asarray(rk, np.float32))
    assert_matches_reference(out, ref, case, "pallas-interpret via ops.backend")


def test_kv_cache_dtype_each_backend_runs() -> None:
    """``--kv-cache-dtype``: the reference reads any cache (cast on read); the native kernel f32
    and f16; the Pallas kernels the model's dtype only. What a backend cannot run is a
    ValueError naming the way out."""
    f32, f16, bf16 = jnp.float32, jnp.float16, jnp.bfloat16
    for kv in (f32, f16, bf16):
        backend.check_kv_cache_dtype("reference", kv, f32)
    backend.check_kv_cache_dtype("native", f16, f32)
    backend.check_kv_cache_dtype("native", f32, f32)
    with pytest.raises(ValueError, match=r"reads a float16, float32 KV cache, not bfloat16.*"
                                         "--attention-backend reference"):
        backend.check_kv_cache_dtype("native", bf16, f32)
    backend.check_kv_cache_dtype("pallas", bf16, bf16, platform="gpu")
    backend.check_kv_cache_dtype("auto", bf16, bf16, platform="tpu")
    with pytest.raises(ValueError, match=r"model's dtype \(bfloat16\), got --kv-cache-dtype "
                                         "float16"):
        backend.check_kv_cache_dtype("auto", f16, bf16, platform="gpu")
    with pytest.raises(ValueError, match="Pallas"):
        backend.check_kv_cache_dtype("pallas-interpret", f16, f32)


def test_engine_refuses_a_kv_cache_dtype_its_backend_cannot_run() -> None:
    """Refused at start-up, before any weight is read (``warmup=False``: nothing compiles)."""
    with pytest.raises(ModelLoadError, match=r"native CPU attention kernel.*not bfloat16"):
        LLMEngine(EngineArgs(model="smollm2-135m-instruct", attention_backend="native",
                             kv_cache_dtype="bfloat16", compilation_cache=False), warmup=False)
    with pytest.raises(ModelLoadError, match="Pallas attention kernels need"):
        LLMEngine(EngineArgs(model="smollm2-135m-instruct", attention_backend="pallas-interpret",
                             kv_cache_dtype="float16", compilation_cache=False), warmup=False)
