"""The asyncio client over the engine thread: streaming, abort on early exit, crash handling."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from models.testing import tiny_loaded
from serving.engine.config import EngineArgs
from serving.engine.engine import LLMEngine
from serving.engine.engine_client import AsyncEngineClient, EngineDeadError
from serving.engine.input_processor import RequestError
from serving.engine.llm import LLM
from serving.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    args = EngineArgs(max_model_len=512, max_num_seqs=8, max_num_batched_tokens=64,
                      compilation_cache=False)
    return LLMEngine(args, loaded=tiny_loaded())


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_concurrent_streams_match_offline_results(engine: LLMEngine) -> None:
    rng = random.Random(0)
    prompts = [[rng.randrange(256) for _ in range(rng.randrange(2, 50))] for _ in range(10)]
    p = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

    async def main() -> list[list[int]]:
        client = AsyncEngineClient(engine)
        await client.start()

        async def one(i: int) -> list[int]:
            toks: list[int] = []
            async for out in client.generate(client.make_request(f"c{i}", prompts[i], p)):
                for d in out.outputs:
                    toks += d.token_ids
            return toks

        res = await asyncio.gather(*(one(i) for i in range(10)))
        await client.shutdown(1.0)
        return list(res)

    streamed = run(main())
    offline = LLM.from_engine(engine).generate(prompts, p, use_tqdm=False)
    assert streamed == [r.outputs[0].token_ids for r in offline]


def test_leaving_the_stream_early_aborts_and_frees_pages(engine: LLMEngine) -> None:
    async def main() -> None:
        client = AsyncEngineClient(engine)
        await client.start()
        free0 = engine.kv.num_free
        p = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
        agen = client.generate(client.make_request("early", list(range(40)), p))
        async for _ in agen:
            break
        await agen.aclose()  # what a disconnecting HTTP handler does
        for _ in range(100):
            if not engine.scheduler.requests and engine.kv.num_free == free0:
                break
            await asyncio.sleep(0.02)
        assert not engine.scheduler.requests and engine.kv.num_free == free0
        assert client.stats().num_running == 0 or not engine.scheduler.running
        await client.shutdown(1.0)

    run(main())


def test_invalid_request_raises_before_queueing(engine: LLMEngine) -> None:
    async def main() -> None:
        client = AsyncEngineClient(engine)
        await client.start()
        with pytest.raises(RequestError, match="maximum context length is 512") as e:
            client.make_request("big", [1] * 500, SamplingParams(max_tokens=100))
        assert e.value.param == "max_tokens"
        with pytest.raises(RequestError, match="top_p") as e:
            client.make_request("bad", [1, 2], SamplingParams(top_p=0.0))
        assert e.value.param == "top_p"
        assert not engine.scheduler.requests and not engine.has_work
        await client.shutdown(1.0)

    run(main())


def test_engine_crash_fails_inflight_requests_and_reports_unhealthy() -> None:
    args = EngineArgs(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=32,
                      compilation_cache=False)
    eng = LLMEngine(args, loaded=tiny_loaded())

    def broken(*_: Any) -> Any:
        raise RuntimeError("device lost")

    async def main() -> None:
        client = AsyncEngineClient(eng)
        await client.start()
        eng.runner.execute = broken  # type: ignore[method-assign]
        p = SamplingParams(max_tokens=10)
        outs = [o async for o in client.generate(client.make_request("doomed", [1, 2, 3], p))]
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "error"
        assert outs[-1].error is not None and "device lost" in outs[-1].error
        assert not client.is_healthy()
        with pytest.raises(EngineDeadError):
            async for _ in client.generate(client.make_request("after", [1, 2, 3], p)):
                pass

    asyncio.run(asyncio.wait_for(main(), timeout=60))
