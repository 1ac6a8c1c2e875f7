"""The device-resident penalty history (``ModelRunner`` "Penalty history"): what the sampler
reads for a penalised row is exactly the sequence's tokens, through slot reuse, preemption and
prefix-cache hits, and a penalised step uploads nothing proportional to ``max_model_len``."""

from __future__ import annotations

import random
from typing import Any

import jax
import numpy as np
import pytest

from models.testing import tiny_loaded
from serving.engine.llm import LLM
from serving.engine.model_runner import DeviceBatch, ModelRunner
from serving.engine.request import SeqStatus
from serving.engine.sampling_params import SamplingParams
from tests.engine.test_engine_tiny import engine_kwargs

MAX_LEN = 2048
PEN = {"frequency_penalty": 1.5, "presence_penalty": 0.5, "repetition_penalty": 1.3}


@pytest.fixture(scope="module")
def llm() -> LLM:
    # 4 slots, 14 pages of 16 tokens: slots are reused and sequences are preempted.
    return LLM(loaded=tiny_loaded(), **engine_kwargs(
        max_model_len=MAX_LEN, max_num_seqs=4, max_num_batched_tokens=32, num_kv_pages=14))


def _device_rows(runner: ModelRunner, slots: list[int], lens: list[int]) -> np.ndarray:
    """The compiled gather the sampler's history comes from, padded to a compiled row count."""
    s = runner.cfg.num_seq_rows(runner.cfg.max_num_batched_tokens)
    pad = s - len(slots)
    out = runner._exe[("hist_rows", s)](runner.history, np.asarray(slots + [-1] * pad, np.int32),
                                         np.asarray(lens + [0] * pad, np.int32))
    return np.asarray(jax.device_get(out))[:len(slots)]


def test_history_rows_are_each_sequences_tokens(llm: LLM) -> None:
    """After every step, each running penalised sequence's history row, as the sampler gets it,
    is its computed tokens and -1 after them: through slot reuse (12 requests, 4 slots),
    preemption (a 14-page pool) and prefix-cache hits (requests sharing 48 prompt tokens, whose
    first row carries the cached prefix). Seen failing with the prefix fill skipped, with the
    step's write skipped, and with the gather's length mask removed."""
    eng = llm.engine
    sch = eng.scheduler
    rng = random.Random(3)
    shared = [rng.randrange(256) for _ in range(48)]
    processor = eng.input_processor()
    for i in range(12):
        prompt = (shared if i % 3 else []) + [rng.randrange(256) for _ in range(rng.randrange(
            4, 30))]
        p = SamplingParams(temperature=rng.choice([0.0, 0.8]), seed=i, max_tokens=30,
                           ignore_eos=True, **PEN)
        eng.add_request(processor.sampling_request(f"h{i}", prompt, p))
    holders: dict[int, set[int]] = {}
    prefixes = checked = 0
    while eng.has_work:
        sched = sch.schedule()
        prefixes += sum(r.history_prefix is not None for r in sched.rows)
        sch.update_from_output(sched, eng.runner.execute(sched, sch.fill_masks))
        running = [s for s in sch.running if s.status == SeqStatus.RUNNING]
        slots = [s.history_slot for s in running]
        assert all(x >= 0 for x in slots) and len(set(slots)) == len(slots)
        for s in running:
            holders.setdefault(s.history_slot, set()).add(s.seq_id)
        if running:
            lens = [s.num_computed for s in running]
            got = _device_rows(eng.runner, slots, lens)
            for s, row in zip(running, got, strict=True):
                want = np.full(MAX_LEN, -1, np.int32)
                want[:s.num_computed] = s.tokens[:s.num_computed]
                np.testing.assert_array_equal(row, want, err_msg=f"seq {s.seq_id}")
                checked += 1
    assert checked > 50
    assert sch.num_preemptions > 0
    assert prefixes > 0  # some admission started past 0 and carried its prefix
    assert any(len(ids) > 1 for ids in holders.values())  # a slot was reused
    assert sorted(sch._free_history_slots) == [0, 1, 2, 3]  # every slot came back


def _step_upload_bytes(llm: LLM, params: SamplingParams, monkeypatch: pytest.MonkeyPatch
                       ) -> int:
    """Host bytes a decode step of 4 rows hands to the device: the numpy leaves of its
    ``DeviceBatch`` (the executables copy them in) plus what ``_put`` uploads while it runs."""
    runner = llm.engine.runner
    counted: list[int] = []
    orig_put, orig_batch = runner._put, runner._batch

    def put(x: Any) -> Any:
        counted.append(sum(np.asarray(v).nbytes for v in jax.tree_util.tree_leaves(x)
                           if isinstance(v, np.ndarray)))
        return orig_put(x)

    def batch(sched: Any) -> tuple[DeviceBatch, np.ndarray]:
        out = orig_batch(sched)
        counted.append(sum(v.nbytes for v in jax.tree_util.tree_leaves(out[0])
                           if isinstance(v, np.ndarray)))
        return out

    monkeypatch.setattr(runner, "_put", put)
    monkeypatch.setattr(runner, "_batch", batch)
    eng = llm.engine
    processor = eng.input_processor()
    for i in range(4):
        eng.add_request(processor.sampling_request(f"u{i}", [5 + i] * 8, params))
    last = 0
    while eng.has_work:
        counted.clear()
        sched = eng.scheduler.schedule()
        eng.scheduler.update_from_output(sched, eng.runner.execute(sched))
        if len(sched.rows) == 4 and all(r.num_tokens == 1 for r in sched.rows):
            last = sum(counted)
    monkeypatch.undo()
    assert last > 0
    return last


def test_penalised_step_upload_does_not_scale_with_max_model_len(
        llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """A penalised decode step uploads less than one history row (4 * max_model_len bytes) more
    than a greedy one; the host-built history it replaced was 4 rows (seen failing on the old
    runner: 32,768 more bytes at max_model_len 2048)."""
    plain = _step_upload_bytes(llm, SamplingParams(temperature=0.0, max_tokens=6,
                                                   ignore_eos=True), monkeypatch)
    pen = _step_upload_bytes(llm, SamplingParams(temperature=0.0, max_tokens=6,
                                                 ignore_eos=True, **PEN), monkeypatch)
    assert pen - plain < 4 * MAX_LEN, (pen, plain)
