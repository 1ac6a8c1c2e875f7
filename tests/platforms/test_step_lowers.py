"""The engine's step, sampler included, lowers for ``cuda`` and ``tpu`` at every token bucket,
for SmolLM2-135M (the default model), Llama-3-8B and Gemma-3-12B shapes in bfloat16, from
abstract arrays, with ``--attention-backend pallas`` (``tests/platforms/steps.py``).

Default run: each model cut to 2 layers (every layer lowers the same ops on the same shapes; the
Gemma cut keeps a sliding and a global layer). ``-m slow``: every layer.
"""

from __future__ import annotations

import pytest

from bench.random_models import SHAPES
from tests.platforms import steps

MODELS = ("smollm2-135m", "llama3-8b", "gemma3-12b")
BUCKETS = tuple(2 ** i for i in range(12))  # 1 .. 2048


def test_every_shape_is_a_bench_shape() -> None:
    assert set(MODELS) <= set(SHAPES)
    runner = steps.abstract_runner("smollm2-135m", "cuda", num_layers=1)
    assert tuple(runner.cfg.token_buckets) == BUCKETS


@pytest.mark.parametrize("platform", steps.PLATFORMS)
@pytest.mark.parametrize("name", MODELS)
def test_step_lowers_at_every_bucket(name: str, platform: str) -> None:
    passed = steps.check_model(name, platform, num_layers=2)
    steps_passed = [p for p in passed if " step[T=" in p]
    assert len(steps_passed) == len(BUCKETS), passed
    assert any(" sample[S=" in p for p in passed) and any(" argmax[S=" in p for p in passed)


@pytest.mark.slow
@pytest.mark.parametrize("platform", steps.PLATFORMS)
@pytest.mark.parametrize("name", MODELS)
def test_step_lowers_at_every_bucket_all_layers(name: str, platform: str) -> None:
    assert steps.check_model(name, platform)
