"""Pooling through the one engine: batching, batch invariance, no recompiles, truncation,
validation, lifecycle, task selection."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

from models.bert import read_config
from models.config import ModelConfig
from models.registry import ModelLoadError
from models.testing import tiny_config
from serving.engine.config import EngineArgs
from serving.engine.engine import EMBED_TASKS, SCORE_TASKS, LLMEngine, serving_tasks
from serving.engine.engine_client import AsyncEngineClient, EngineDeadError
from serving.engine.input_processor import InputProcessor
from serving.engine.llm import LLM
from serving.engine.pooling_params import PoolingInput, PoolingParams
from tests.pooling.conftest import CROSS_ENCODER, ROBERTA, embed, load_golden, run_async, steps_of


def _varied(n: int) -> list[list[int]]:
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


def test_batch_invariance_embeddings(minilm: LLM) -> None:
    probe = minilm.processor.tokenize(
        ["Batch invariance: this embedding must not depend on neighbours."])
    x = list(probe[0].token_ids)
    alone = embed(minilm, [x])[0]
    others = _varied(31)
    others[0] = others[0][:1] + [2773] * 60 + others[0][-1:]  # 62 tokens
    batch = [*others[:15], x, *others[15:]]
    before = steps_of(minilm)
    outs = embed(minilm, batch)
    assert steps_of(minilm) - before == 1  # one step held all 32
    inside = outs[15]
    assert float(alone @ inside) >= 0.999999
    assert np.abs(alone - inside).max() < 1e-5
    # And every other member equals its own solo run.
    for ids, out in zip(batch[:4], outs[:4], strict=True):
        solo = embed(minilm, [ids])[0]
        assert np.abs(solo - out).max() < 1e-5


def test_batch_invariance_cross_encoder(cross_encoder: LLM) -> None:
    meta, _ = load_golden("cross_encoder")
    inputs = [PoolingInput(i, t) for i, t in zip(meta["token_ids"], meta["token_type_ids"],
                                                 strict=True)]
    together = cross_encoder.encode(inputs, PoolingParams(task="score"))
    for inp, out in zip(inputs, together, strict=True):
        solo = cross_encoder.encode([inp], PoolingParams(task="score"))[0]
        assert abs(float(solo.data[0] - out.data[0])) < 1e-5


def test_no_recompiles_while_serving(minilm: LLM) -> None:
    runner = minilm.engine.runner
    assert runner.cfg.token_buckets == [64, 256, 2048]
    st = minilm.engine.get_stats()
    assert st.num_executables == len(runner.cfg.token_buckets)  # one step (pooling in it) each
    many = _varied(70)
    long_one = [101] + [2773] * 200 + [102]
    embed(minilm, [*many, long_one])
    embed(minilm, [*many[:11], long_one], PoolingParams(task="encode"))
    for n in (1, 2, 7, 9, 33):
        embed(minilm, many[:n])
    st = minilm.engine.get_stats()
    assert st.num_executables == len(runner.cfg.token_buckets)
    assert st.num_recompiles == 0


def test_concurrent_requests_share_steps(minilm: LLM) -> None:
    texts = [f"request number {i} asks about topic {i * 7}" for i in range(24)]
    ids = [list(x.token_ids) for x in minilm.processor.tokenize(texts)]
    solo = [embed(minilm, [x])[0] for x in ids[:3]]

    async def all_at_once(client: AsyncEngineClient) -> list[list[np.ndarray]]:
        outs = await asyncio.gather(*(client.encode([PoolingInput(x)], PoolingParams())
                                      for x in ids))
        return [[o.data for o in out] for out in outs]

    steps_before = steps_of(minilm)
    outs = run_async(minilm.engine, all_at_once)
    steps = steps_of(minilm) - steps_before
    assert steps < len(ids)  # requests were batched together
    for a, b in zip(solo, outs[:3], strict=True):
        assert np.abs(a - b[0]).max() < 1e-5


def test_truncate_prompt_tokens(minilm: LLM) -> None:
    long_ids = [101, *range(2000, 2300), 102]  # 302 tokens > max_model_len 256
    with pytest.raises(ValueError, match="you requested 302 tokens in the input for embedding"):
        embed(minilm, [long_ids])
    out = minilm.encode([PoolingInput(long_ids)], PoolingParams(truncate_prompt_tokens=10))
    assert out[0].num_prompt_tokens == 10
    same = embed(minilm, [long_ids[-10:]])[0]
    np.testing.assert_array_equal(out[0].data, same)  # keeps the last 10 tokens
    full = minilm.encode([PoolingInput(long_ids)], PoolingParams(truncate_prompt_tokens=-1))
    assert full[0].num_prompt_tokens == 256
    with pytest.raises(ValueError, match="Please, select a smaller truncation size"):
        embed(minilm, [long_ids], PoolingParams(truncate_prompt_tokens=257))


def test_text_truncation_keeps_special_tokens(minilm: LLM) -> None:
    (x,) = minilm.processor.tokenize(["one two three four five six seven eight"],
                                     truncate_prompt_tokens=5)
    assert len(x.token_ids) == 5
    assert x.token_ids[0] == 101 and x.token_ids[-1] == 102
    assert minilm.tokenizer.decode(x.token_ids[1:-1]) == "six seven eight"


def test_invalid_requests_are_value_errors(minilm: LLM) -> None:
    cases = [
        ([[]], PoolingParams(), "at least one token"),
        ([[101, 99999, 102]], PoolingParams(), "out of vocabulary"),
        ([[101, 102]], PoolingParams(dimensions=128), "matryoshka"),
        ([[101, 102]], PoolingParams(task="classify"), "does not support"),
        ([[101, 102]], PoolingParams(task="embed", activation=True), "activation"),
        ([[101, 102]], PoolingParams(truncate_prompt_tokens=0), "truncate_prompt_tokens"),
        ([[101, 102]], PoolingParams(task="nope"), "task"),
    ]
    steps = steps_of(minilm)
    for ids, params, msg in cases:
        with pytest.raises(ValueError, match=msg):
            embed(minilm, ids, params)
    assert embed(minilm, [], PoolingParams()) == []
    assert steps_of(minilm) == steps  # refused before anything ran


def test_bad_token_types_are_refused(cross_encoder: LLM) -> None:
    with pytest.raises(ValueError, match="as long as"):
        cross_encoder.encode([PoolingInput([101, 102], [0])], PoolingParams(task="score"))
    with pytest.raises(ValueError, match="out of range"):
        cross_encoder.encode([PoolingInput([101, 102], [0, 2])], PoolingParams(task="score"))


def test_cancelled_request_does_not_break_the_engine(minilm: LLM) -> None:
    ids = _varied(32)

    async def scenario(client: AsyncEngineClient) -> tuple[list[np.ndarray], bool, int]:
        task = asyncio.create_task(client.encode([PoolingInput(x) for x in ids],
                                                 PoolingParams()))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        outs = await client.encode([PoolingInput(x) for x in ids[:2]], PoolingParams())
        return [o.data for o in outs], client.is_healthy(), client.num_in_flight

    outs, healthy, in_flight = run_async(minilm.engine, scenario)
    assert len(outs) == 2 and healthy
    assert in_flight == 0
    minilm.engine.kv.check()
    assert not minilm.engine.has_work


def test_from_args_lifecycle_and_shutdown() -> None:
    args = EngineArgs(model=str(CROSS_ENCODER), max_model_len=64, max_num_seqs=4)
    client = AsyncEngineClient.from_args(args)
    assert client.info.tasks == ("classify", "score")
    assert client.engine.runner.cfg.token_buckets == [16, 32, 64, 128, 256]  # 4 x 64 tokens

    async def scenario() -> None:
        with pytest.raises(EngineDeadError):
            await client.encode([PoolingInput([101, 102])], PoolingParams(task="score"))
        await client.start()
        assert client.is_healthy()
        pairs = client.tokenize_pairs(["what is jax"], ["jax is a library"])
        (out,) = await client.encode(pairs, PoolingParams(task="score"))
        assert out.data.shape == (1,) and 0.0 < float(out.data[0]) < 1.0
        await client.shutdown(drain_timeout=5)
        assert not client.is_healthy()
        with pytest.raises(EngineDeadError):
            await client.encode(pairs, PoolingParams(task="score"))

    asyncio.run(scenario())
    assert client.stats().num_recompiles == 0


def test_from_args_refuses_bad_models() -> None:
    base = dict(max_num_seqs=4, compilation_cache=False)
    with pytest.raises(ModelLoadError, match="exceeds"):
        LLMEngine(EngineArgs(model=str(ROBERTA), max_model_len=65, **base), warmup=False)
    with pytest.raises(ModelLoadError, match="dtype"):
        LLMEngine(EngineArgs(model=str(ROBERTA), dtype="int8", **base), warmup=False)
    with pytest.raises(ModelLoadError):
        LLMEngine(EngineArgs(model="/nonexistent/model", **base), warmup=False)


def test_roberta_default_max_model_len_excludes_offset() -> None:
    engine = LLMEngine(EngineArgs(model=str(ROBERTA), dtype="float32", max_num_seqs=2,
                                  compilation_cache=False), warmup=False)
    # 66 position rows minus pad_token_id + 1 = 64 usable positions.
    assert engine.max_model_len == 64
    assert engine.tokenizer is None  # this fixture ships none: token ids only
    with pytest.raises(ValueError, match="no tokenizer"):
        engine.input_processor().tokenize(["hello"])


def test_matryoshka_dimensions(minilm: LLM) -> None:
    """A model whose config declares Matryoshka sizes: truncate, then normalise. (MiniLM's
    facts with the two fields added; the same compiled engine, so nothing recompiles.)"""
    facts = minilm.engine.facts
    assert facts.pooling is not None
    info = dataclasses.replace(facts.pooling, is_matryoshka=True,
                               matryoshka_dimensions=(128, 256))
    plain = minilm.processor
    minilm.processor = InputProcessor(dataclasses.replace(facts, pooling=info),
                                      minilm.tokenizer)
    try:
        ids = [list(x.token_ids) for x in plain.tokenize(
            ["matryoshka dolls nest inside each other"])]
        full = embed(minilm, ids, PoolingParams(normalize=False))[0]
        (short,) = embed(minilm, ids, PoolingParams(dimensions=128))
        assert short.shape == (128,)
        np.testing.assert_allclose(short, full[:128] / np.linalg.norm(full[:128]), atol=1e-6)
        with pytest.raises(ValueError, match=r"only supports \[128, 256\]"):
            embed(minilm, ids, PoolingParams(dimensions=100))
        with pytest.raises(ValueError, match="greater than 0"):
            embed(minilm, ids, PoolingParams(dimensions=0))
    finally:
        minilm.processor = plain
    assert minilm.engine.get_stats().num_recompiles == 0


def test_task_selection() -> None:
    """What one engine serves: --task auto generates on decoders and pools on BERT-family
    encoders, --task embed pools on both; explicit tasks must fit the checkpoint."""
    dec: ModelConfig = tiny_config()
    assert serving_tasks("auto", dec) == serving_tasks("generate", dec) == ("generate",)
    assert serving_tasks("embed", dec) == serving_tasks("embedding", dec) == EMBED_TASKS
    with pytest.raises(ModelLoadError, match="needs a BERT-family cross-encoder"):
        serving_tasks("score", dec)
    ce = read_config(CROSS_ENCODER)
    assert serving_tasks("auto", ce) == serving_tasks("score", ce) == SCORE_TASKS
    with pytest.raises(ModelLoadError, match="cross-encoder"):
        serving_tasks("embed", ce)
    with pytest.raises(ModelLoadError, match="is an encoder"):
        serving_tasks("generate", ce)
    emb = dataclasses.replace(ce, architecture="BertModel", num_labels=0)
    assert serving_tasks("auto", emb) == serving_tasks("embed", emb) == EMBED_TASKS
    with pytest.raises(ModelLoadError, match="no classification head"):
        serving_tasks("classify", emb)
