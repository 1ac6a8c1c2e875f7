"""The engine's host work per decode step at many sequences, which an accelerator cannot hide.

    .venv/bin/python -m bench.host_overhead --seqs 256 --steps 30

A tiny random-weight model (``bench/random_models.py`` "tiny-llama") makes the device part
negligible, so what is timed is the host: the scheduler (``schedule``, ``update_from_output``),
the runner's input packing (``ModelRunner._batch``: the padded step inputs and sampling arrays),
its result unpacking (``_results``: device-to-host copy and the per-row records), and the output
processor (detokenization, stop checks). ``_run`` (dispatch and the tiny model's device time) is
timed too and reported apart. Every sequence is decoding (prompts prefilled first), greedy, so
the step runs the argmax; ``--sampled`` gives every row temperature/top-p instead, and
``--penalties`` adds presence/frequency/repetition penalties (with ``--sampled``: on top of it).
``--max-model-len`` widens the page tables and the penalty history (default: just enough).
Prints one JSON line: the median milliseconds of each phase over ``--steps`` steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

PHASES = ("schedule", "batch", "run", "results", "update", "outputs")


def _timed(store: list[float], fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*a, **k)
        store.append(time.perf_counter() - t0)
        return out
    return wrapper


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--sampled", action="store_true")
    ap.add_argument("--penalties", action="store_true")
    ap.add_argument("--max-model-len", type=int, default=0)
    args = ap.parse_args(argv)

    import jax

    from bench.random_models import random_loaded
    from serving.engine.llm import LLM
    from serving.engine.sampling_params import SamplingParams

    n = args.seqs
    total = max(args.prompt_len + args.steps + 8, args.max_model_len)
    llm = LLM(loaded=random_loaded("tiny-llama", "float32", "reference"), max_num_seqs=n,
              max_num_batched_tokens=n * (args.prompt_len + 1), max_model_len=total, block_size=16,
              compilation_cache=False)
    eng, runner, sch = llm.engine, llm.engine.runner, llm.engine.scheduler
    gen = total - args.prompt_len
    pen = {"presence_penalty": 0.5, "frequency_penalty": 0.3, "repetition_penalty": 1.1} \
        if args.penalties else {}
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_tokens=gen,
                            ignore_eos=True, **pen) if args.sampled else \
        SamplingParams(temperature=0.0, max_tokens=gen, ignore_eos=True, **pen)
    for i in range(n):
        spec = llm.processor.sampling_request(f"r{i}", [(7 * i + j) % 250 for j in
                                                        range(args.prompt_len)], params)
        llm.outputs.add(spec)
        eng.add_request(spec)
    while sch.waiting or any(len(s.tokens) - s.num_computed > 1 for s in sch.running):
        llm.outputs.process(eng.step())  # prefill until every sequence decodes
    times: dict[str, list[float]] = {p: [] for p in PHASES}
    sch.schedule = _timed(times["schedule"], sch.schedule)  # type: ignore[method-assign]
    sch.update_from_output = _timed(times["update"], sch.update_from_output)  # type: ignore
    runner._batch = _timed(times["batch"], runner._batch)  # type: ignore[method-assign]
    runner._results = _timed(times["results"], runner._results)  # type: ignore
    run = runner._run

    def run_sync(batch: Any, fill: Any = None) -> Any:
        out = run(batch, fill)
        jax.block_until_ready(out)
        return out

    runner._run = _timed(times["run"], run_sync)  # type: ignore[method-assign]
    rows = []
    for _ in range(args.steps):
        rows.append(len(sch.running))
        outs = eng.step()
        _timed(times["outputs"], llm.outputs.process)(outs)
    med = {p: 1e3 * statistics.median(v) for p, v in times.items()}
    host = sum(v for p, v in med.items() if p != "run")
    row = {"seqs": n, "running_min": min(rows), "steps": args.steps, "sampled": args.sampled,
           "penalties": args.penalties, "max_model_len": total,
           **{f"{p}_ms": round(v, 3) for p, v in med.items()}, "host_ms": round(host, 3),
           "device": jax.devices()[0].device_kind}
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
