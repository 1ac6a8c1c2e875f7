"""Whole decode step, native CPU kernels against the reference path: interleaved A/B in one
process (a shared machine: only the ratios mean something).

    .venv/bin/python -m bench.native_ab --seqs 1 32 --rounds 15

One engine per variant on the real model (default SmolLM2-135M-Instruct, f32 activations):
``reference`` (``--attention-backend reference``), ``native-f32`` and ``native-f16``
(``--attention-backend native --cpu-weight-dtype f32|f16``; ``--isa avx2`` forces the AVX2
build). ``--kv-cache-dtypes auto float16`` runs each variant with each KV-cache dtype
(``--kv-cache-dtype``): a non-auto one is named ``VARIANT+kv-DTYPE`` and also reports
``kv_speedup``, the same variant's auto (model-dtype) cache median over its own. For each batch
size S, every engine gets S greedy requests (a ``--prompt-len`` prompt,
prefilled first), then the rounds time one ``engine.step()`` (schedule, inputs, the model step,
the argmax, results: one decode token for all S sequences) of each engine in turn, in a rotating
order. Reported per S: each variant's median and minimum step in ms, and the reference's median
over each variant's median (the speed-up; > 1 is faster), plus the same from process CPU time.
Prints one JSON line per S.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

VARIANTS = {"reference": ("reference", "f32"), "native-f32": ("native", "f32"),
            "native-f16": ("native", "f16")}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--seqs", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--isa", default=None, help="force a native build (sets XLASERVE_CPU_ISA)")
    ap.add_argument("--kv-cache-dtypes", nargs="+", default=["auto"],
                    choices=("auto", "float16", "bfloat16", "float32"),
                    help="run each variant with each of these KV-cache dtypes")
    args = ap.parse_args(argv)
    if args.isa:
        os.environ["XLASERVE_CPU_ISA"] = args.isa

    import jax

    from ops import native
    from serving.engine.llm import LLM
    from serving.engine.sampling_params import SamplingParams

    rows = []
    max_seqs = max(args.seqs)
    # Sequences admitted first decode while later prompts prefill (256 tokens a step): room for
    # those tokens too, so that every sequence still runs through all the rounds.
    gen = args.rounds + 8 + max_seqs * args.prompt_len // 256
    total = args.prompt_len + gen + 8
    llms = {}
    kv_base: dict[str, str] = {}  # a non-auto cache variant -> the same variant, auto cache
    for name, kv_dtype in ((n, kv) for n in args.variants for kv in args.kv_cache_dtypes):
        backend, wdt = VARIANTS[name]
        if kv_dtype != "auto":
            kv_base[f"{name}+kv-{kv_dtype}"] = name
            name = f"{name}+kv-{kv_dtype}"
        llms[name] = LLM(args.model, attention_backend=backend, cpu_weight_dtype=wdt,
                         kv_cache_dtype=kv_dtype,
                         max_num_seqs=max_seqs, max_model_len=total,
                         num_kv_pages=max_seqs * (-(-total // 16)) + 2,
                         max_num_batched_tokens=max(256, max_seqs),
                         token_buckets=tuple(sorted({1, *args.seqs, 256})),
                         compilation_cache=False)
    params = SamplingParams(temperature=0.0, max_tokens=gen, ignore_eos=True)
    for n in args.seqs:
        for name, llm in llms.items():
            eng, sch = llm.engine, llm.engine.scheduler
            for i in range(n):
                spec = llm.processor.sampling_request(
                    f"{name}-{n}-{i}", [(7 * i + j) % 250 + 3 for j in range(args.prompt_len)],
                    params)
                llm.outputs.add(spec)
                eng.add_request(spec)
            while sch.waiting or any(len(s.tokens) - s.num_computed > 1 for s in sch.running):
                llm.outputs.process(eng.step())
        wall: dict[str, list[float]] = {k: [] for k in llms}
        cpu: dict[str, list[float]] = {k: [] for k in llms}
        names = list(llms)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                llm = llms[name]
                assert len(llm.engine.scheduler.running) == n
                c0, t0 = time.process_time(), time.perf_counter()
                llm.outputs.process(llm.engine.step())
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        for llm in llms.values():  # finish this batch size's requests
            while llm.engine.scheduler.running:
                llm.outputs.process(llm.engine.step())
        med = {k: statistics.median(v) for k, v in wall.items()}
        cmed = {k: statistics.median(v) for k, v in cpu.items()}
        row: dict[str, Any] = {"seqs": n, "rounds": args.rounds, "prompt_len": args.prompt_len}
        for k in llms:
            row[f"{k}_median_ms"] = round(1e3 * med[k], 2)
            row[f"{k}_min_ms"] = round(1e3 * min(wall[k]), 2)
            if "reference" in llms and k != "reference":
                row[f"{k}_speedup"] = round(med["reference"] / med[k], 2)
                row[f"{k}_speedup_cpu_time"] = round(cmed["reference"] / cmed[k], 2)
            if kv_base.get(k) in llms:
                row[f"{k}_kv_speedup"] = round(med[kv_base[k]] / med[k], 2)
                row[f"{k}_kv_speedup_cpu_time"] = round(cmed[kv_base[k]] / cmed[k], 2)
        host = native.kernels()
        row["isa"] = host.isa if host else None
        row["device"] = jax.devices()[0].device_kind
        row["loadavg"] = os.getloadavg()[0]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
