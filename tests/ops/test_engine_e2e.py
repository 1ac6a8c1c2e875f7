"""End to end: the engine with a Pallas kernel (interpret mode, chosen through ``ops.backend``)
gives the same greedy tokens as the engine on the reference path, on the tiny random models.

The tiny models get head_dim 16 (a power of two, as the Triton kernel needs; the stock tiny
config has 14). Prompts are longer than the token budget, so prefill is chunked and decode and
prefill chunks share steps; the gemma3 family adds the sliding window and its query scaling.
"""

from __future__ import annotations

import random

import jax
import pytest

from models.testing import tiny_loaded
from ops import backend
from serving.engine.llm import LLM
from serving.engine.sampling_params import SamplingParams

ENGINE = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=16, block_size=16,
              compilation_cache=False)


def _greedy_tokens(attention_backend: str, family: str, prompts: list[list[int]],
                   platform: str | None = None) -> list[list[int]]:
    attn, write, _ = backend.get_attention_fn(attention_backend, platform=platform)
    loaded = tiny_loaded(family, head_dim=16, attn_fn=attn, write_fn=write)
    assert loaded.model.layers[0].attn.attn_fn is attn
    llm = LLM(loaded=loaded, **ENGINE)
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    return [r.outputs[0].token_ids for r in llm.generate(prompts, greedy, use_tqdm=False)]


def _prompts() -> list[list[int]]:
    rng = random.Random(5)
    return [[rng.randrange(256) for _ in range(n)] for n in (3, 45, 17, 70, 9, 31)]


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_engine_with_kernel_matches_reference_path(family: str) -> None:
    """The GPU (Triton) kernel: what ``--attention-backend pallas-interpret`` runs on CPU."""
    want = _greedy_tokens("reference", family, _prompts())
    got = _greedy_tokens("pallas-interpret", family, _prompts())
    assert all(len(t) == 12 for t in want)
    assert got == want


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_engine_with_tpu_kernel_matches_reference_path(family: str) -> None:
    """The TPU (Mosaic) kernel in TPU interpret mode (slow to compile)."""
    want = _greedy_tokens("reference", family, _prompts())
    got = _greedy_tokens("pallas-interpret", family, _prompts(), platform="tpu")
    assert got == want


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_engine_with_compiled_gpu_kernel_matches_reference_path(family: str) -> None:
    """On a GPU (``bench/gpu_check.sh``): the compiled Triton kernel, as ``--attention-backend
    pallas`` runs it, against the reference path on the same device."""
    want = _greedy_tokens("reference", family, _prompts())
    got = _greedy_tokens("pallas", family, _prompts())
    assert all(len(t) == 12 for t in want)
    assert got == want
