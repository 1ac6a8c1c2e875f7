"""PoolingEngine: batching, batch invariance, no recompiles, truncation, validation, lifecycle."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from models.bert import read_config
from models.registry import ModelLoadError
from serving.engine.engine_client import EngineDeadError
from serving.engine.pooling_engine import (
    PoolingEngine,
    PoolingInput,
    check_task,
    wants_pooling_engine,
)
from serving.engine.pooling_params import PoolingParams
from tests.pooling.conftest import CROSS_ENCODER, ROBERTA, load_golden


def _varied(minilm: PoolingEngine, n: int) -> list[list[int]]:
    """n inputs of lengths spread over 3..64 tokens, from the golden sentences and filler."""
    meta, _ = load_golden("minilm")
    pool = [ids for ids in meta["token_ids"] if len(ids) <= 64]
    out = []
    for i in range(n):
        ids = pool[i % len(pool)]
        if i % 3 == 0:  # vary lengths further with repeated words
            ids = ids[:-1] + [2773] * (i % 40) + ids[-1:]
        out.append(ids[:64])
    return out


def _step_delta(engine: PoolingEngine, before: Counter[tuple[int, int]]) -> Counter[
        tuple[int, int]]:
    return engine.step_sizes - before


def test_batch_invariance_embeddings(minilm: PoolingEngine) -> None:
    probe = minilm.tokenize(["Batch invariance: this embedding must not depend on neighbours."])
    x = probe[0].token_ids
    alone = asyncio.run(minilm.embed([x], PoolingParams()))[0]
    others = _varied(minilm, 31)
    others[0] = others[0][:1] + [2773] * 60 + others[0][-1:]  # 62 tokens, first: T bucket 64
    batch = [*others[:15], x, *others[15:]]
    before = Counter(minilm.step_sizes)
    outs = asyncio.run(minilm.embed(batch, PoolingParams()))
    assert _step_delta(minilm, before) == Counter({(32, 64): 1})  # one step held all 32
    inside = outs[15]
    assert float(alone @ inside) >= 0.999999
    assert np.abs(alone - inside).max() < 1e-5
    # And every other member equals its own solo run.
    for ids, out in zip(batch[:4], outs[:4], strict=True):
        solo = asyncio.run(minilm.embed([ids], PoolingParams()))[0]
        assert np.abs(solo - out).max() < 1e-5


def test_batch_invariance_cross_encoder(cross_encoder: PoolingEngine) -> None:
    meta, _ = load_golden("cross_encoder")
    inputs = [PoolingInput(i, t) for i, t in zip(meta["token_ids"], meta["token_type_ids"],
                                                 strict=True)]
    together = asyncio.run(cross_encoder.encode(inputs, PoolingParams(task="score")))
    for inp, out in zip(inputs, together, strict=True):
        solo = asyncio.run(cross_encoder.encode([inp], PoolingParams(task="score")))[0]
        assert abs(float(solo.data[0] - out.data[0])) < 1e-5


def test_no_recompiles_while_serving(minilm: PoolingEngine) -> None:
    compiles = minilm.stats().num_compiles
    assert minilm.runner.warmed_up and compiles == sum(
        len(minilm.runner.shapes(k)) for k in minilm.runner.kinds)
    many = _varied(minilm, 70)
    long_one = [101] + [2773] * 200 + [102]
    asyncio.run(minilm.embed([*many, long_one], PoolingParams()))
    asyncio.run(minilm.embed([*many[:11], long_one], PoolingParams(task="encode")))
    for n in (1, 2, 7, 9, 33):
        asyncio.run(minilm.embed(many[:n], PoolingParams()))
    st = minilm.stats()
    assert st.num_compiles == compiles
    assert st.num_recompiles == 0


def test_concurrent_requests_share_steps(minilm: PoolingEngine) -> None:
    texts = [f"request number {i} asks about topic {i * 7}" for i in range(24)]
    ids = [x.token_ids for x in minilm.tokenize(texts)]
    solo = [asyncio.run(minilm.embed([x], PoolingParams()))[0] for x in ids[:3]]

    async def all_at_once() -> list[list[np.ndarray]]:
        return await asyncio.gather(*(minilm.embed([x], PoolingParams()) for x in ids))

    steps_before = minilm.stats().num_steps
    outs = asyncio.run(all_at_once())
    steps = minilm.stats().num_steps - steps_before
    assert steps < len(ids)  # requests were batched together
    for a, b in zip(solo, outs[:3], strict=True):
        assert np.abs(a - b[0]).max() < 1e-5


def test_truncate_prompt_tokens(minilm: PoolingEngine) -> None:
    long_ids = [101, *range(2000, 2300), 102]  # 302 tokens > max_model_len 256
    with pytest.raises(ValueError, match="you requested 302 tokens in the input for embedding"):
        asyncio.run(minilm.embed([long_ids], PoolingParams()))
    out = asyncio.run(minilm.encode([PoolingInput(long_ids)],
                                    PoolingParams(truncate_prompt_tokens=10)))
    assert out[0].num_prompt_tokens == 10
    same = asyncio.run(minilm.embed([long_ids[-10:]], PoolingParams()))[0]
    np.testing.assert_array_equal(out[0].data, same)  # keeps the last 10 tokens
    full = asyncio.run(minilm.encode([PoolingInput(long_ids)],
                                     PoolingParams(truncate_prompt_tokens=-1)))
    assert full[0].num_prompt_tokens == 256
    with pytest.raises(ValueError, match="Please, select a smaller truncation size"):
        asyncio.run(minilm.embed([long_ids], PoolingParams(truncate_prompt_tokens=257)))


def test_text_truncation_keeps_special_tokens(minilm: PoolingEngine) -> None:
    (x,) = minilm.tokenize(["one two three four five six seven eight"],
                           truncate_prompt_tokens=5)
    assert len(x.token_ids) == 5
    assert x.token_ids[0] == 101 and x.token_ids[-1] == 102
    assert minilm.tokenizer.decode(x.token_ids[1:-1]) == "six seven eight"


def test_invalid_requests_are_value_errors(minilm: PoolingEngine) -> None:
    cases = [
        ([[]], PoolingParams(), "at least one token"),
        ([[101, 99999, 102]], PoolingParams(), "out of vocabulary"),
        ([[101, 102]], PoolingParams(dimensions=128), "matryoshka"),
        ([[101, 102]], PoolingParams(task="classify"), "does not support"),
        ([[101, 102]], PoolingParams(task="embed", activation=True), "activation"),
        ([[101, 102]], PoolingParams(truncate_prompt_tokens=0), "truncate_prompt_tokens"),
        ([[101, 102]], PoolingParams(task="nope"), "task"),
    ]
    for ids, params, msg in cases:
        with pytest.raises(ValueError, match=msg):
            asyncio.run(minilm.embed(ids, params))
    assert asyncio.run(minilm.embed([], PoolingParams())) == []


def test_bad_token_types_are_refused(cross_encoder: PoolingEngine) -> None:
    with pytest.raises(ValueError, match="as long as"):
        asyncio.run(cross_encoder.encode([PoolingInput([101, 102], [0])],
                                         PoolingParams(task="score")))
    with pytest.raises(ValueError, match="out of range"):
        asyncio.run(cross_encoder.encode([PoolingInput([101, 102], [0, 2])],
                                         PoolingParams(task="score")))


def test_cancelled_request_does_not_break_the_engine(minilm: PoolingEngine) -> None:
    ids = _varied(minilm, 32)

    async def scenario() -> list[np.ndarray]:
        task = asyncio.create_task(minilm.embed(ids, PoolingParams()))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await minilm.embed(ids[:2], PoolingParams())

    outs = asyncio.run(scenario())
    assert len(outs) == 2 and minilm.is_healthy()
    assert minilm.num_in_flight == 0


def test_from_args_lifecycle_and_shutdown() -> None:
    args = SimpleNamespace(model=str(CROSS_ENCODER), tokenizer=None, dtype="auto",
                           max_model_len=64, max_num_seqs=4, max_num_batched_tokens=None,
                           cache_dir=None, compilation_cache=True)
    engine = PoolingEngine.from_args(args)
    assert engine.info.tasks == ("classify", "score")
    assert engine.runner.token_buckets == [16, 32, 64] and engine.runner.seq_buckets == [1, 2, 4]

    async def scenario() -> None:
        with pytest.raises(EngineDeadError):
            await engine.encode([PoolingInput([101, 102])], PoolingParams(task="score"))
        await engine.start()
        assert engine.is_healthy()
        pairs = engine.tokenize_pairs(["what is jax"], ["jax is a library"])
        (out,) = await engine.encode(pairs, PoolingParams(task="score"))
        assert out.data.shape == (1,) and 0.0 < float(out.data[0]) < 1.0
        await engine.shutdown(drain_timeout=5)
        assert not engine.is_healthy()
        with pytest.raises(EngineDeadError):
            await engine.encode(pairs, PoolingParams(task="score"))

    asyncio.run(scenario())
    assert engine.stats().num_recompiles == 0


def test_from_args_refuses_bad_models() -> None:
    base = dict(tokenizer=None, dtype="auto", max_model_len=None, max_num_seqs=4,
                max_num_batched_tokens=None, cache_dir=None, compilation_cache=False)
    with pytest.raises(ModelLoadError, match="exceeds"):
        PoolingEngine.from_args(SimpleNamespace(model=str(ROBERTA), **{**base,
                                                                       "max_model_len": 65}),
                                warmup=False)
    with pytest.raises(ModelLoadError, match="dtype"):
        PoolingEngine.from_args(SimpleNamespace(model=str(ROBERTA), **{**base, "dtype": "int8"}),
                                warmup=False)
    with pytest.raises(ModelLoadError):
        PoolingEngine.from_args(SimpleNamespace(model="/nonexistent/model", **base),
                                warmup=False)


def test_roberta_default_max_model_len_excludes_offset() -> None:
    args = SimpleNamespace(model=str(ROBERTA), tokenizer=None, dtype="float32",
                           max_model_len=None, max_num_seqs=2, max_num_batched_tokens=None,
                           cache_dir=None, compilation_cache=False)
    engine = PoolingEngine.from_args(args, warmup=False)
    # 66 position rows minus pad_token_id + 1 = 64 usable positions.
    assert engine.max_model_len == 64
    assert engine.tokenizer is None  # this fixture ships none: token ids only
    with pytest.raises(ValueError, match="no tokenizer"):
        engine.tokenize(["hello"])


def test_matryoshka_dimensions(minilm: PoolingEngine) -> None:
    """A model whose config declares Matryoshka sizes: truncate, then normalise. (MiniLM's
    config with the two fields added; the same compiled runner, so nothing recompiles.)"""
    cfg = dataclasses.replace(minilm.model_config, is_matryoshka=True,
                              matryoshka_dimensions=(128, 256))
    engine = PoolingEngine(minilm.runner, cfg, minilm.pooler_config, minilm.tokenizer)
    engine.start_thread()
    try:
        ids = [x.token_ids for x in minilm.tokenize(["matryoshka dolls nest inside each other"])]
        full = asyncio.run(engine.embed(ids, PoolingParams(normalize=False)))[0]
        (short,) = asyncio.run(engine.embed(ids, PoolingParams(dimensions=128)))
        assert short.shape == (128,)
        np.testing.assert_allclose(short, full[:128] / np.linalg.norm(full[:128]), atol=1e-6)
        with pytest.raises(ValueError, match=r"only supports \[128, 256\]"):
            asyncio.run(engine.embed(ids, PoolingParams(dimensions=100)))
        with pytest.raises(ValueError, match="greater than 0"):
            asyncio.run(engine.embed(ids, PoolingParams(dimensions=0)))
    finally:
        engine.close()


def test_task_selection() -> None:
    """``serve``'s choice of engine: --task auto picks the pooling engine for BERT-family
    directories only, --task embed also for decoders; explicit tasks must fit the checkpoint."""
    def args(model: str, task: str) -> SimpleNamespace:
        return SimpleNamespace(model=model, task=task, cache_dir=None)

    assert wants_pooling_engine(args("all-minilm-l6-v2", "auto"))
    assert wants_pooling_engine(args(str(CROSS_ENCODER), "score"))
    assert not wants_pooling_engine(args("smollm2-135m-instruct", "auto"))
    assert not wants_pooling_engine(args("smollm2-135m-instruct", "generate"))
    assert wants_pooling_engine(args("smollm2-135m-instruct", "embed"))  # decoder embeddings
    with pytest.raises(ModelLoadError, match="needs a BERT-family cross-encoder"):
        wants_pooling_engine(args("smollm2-135m-instruct", "score"))
    with pytest.raises(ModelLoadError, match="is an encoder"):
        wants_pooling_engine(args("all-minilm-l6-v2", "generate"))
    cfg = read_config(CROSS_ENCODER)
    with pytest.raises(ModelLoadError, match="cross-encoder"):
        check_task("embed", cfg)
    with pytest.raises(ModelLoadError, match="no classification head"):
        check_task("classify", dataclasses.replace(cfg, architecture="BertModel", num_labels=0))
    check_task("score", cfg)
