"""Whole decode step, native CPU kernels against the reference path: interleaved A/B in one
process (a shared machine: only the ratios mean something).

    .venv/bin/python -m bench.native_ab --seqs 1 32 --rounds 15

One engine per variant on the real model (default SmolLM2-135M-Instruct, f32 activations):
``reference`` (``--attention-backend reference``), ``native-f32``, ``native-f16`` and
``native-q8_0`` (``--attention-backend native --cpu-weight-dtype f32|f16|q8_0``; ``--isa avx2``
forces the AVX2 build). ``--kv-cache-dtypes auto float16`` runs each variant with each KV-cache
dtype (``--kv-cache-dtype``): a non-auto one is named ``VARIANT+kv-DTYPE`` and also reports
``kv_speedup``, the same variant's auto (model-dtype) cache median over its own. For each batch
size S, every engine gets S greedy requests (a ``--prompt-len`` prompt, prefilled first), then
the rounds time one ``engine.step()`` (schedule, inputs, the model step, the argmax, results: one
decode token for all S sequences) of each engine in turn, in a rotating order. Reported per S:
each variant's median and minimum step in ms, and the baseline's (``--baseline``, default the
reference) median over each variant's median (the speed-up; > 1 is faster), the same from the
minima and from process CPU time. Prints one JSON line per S.

``--gemm-only`` times instead the packed GEMMs of one decode step alone (no attention, no
host): SmolLM2's 30 layers of qkv [576, 960], o [576, 576], gate_up [576, 3072] and down
[1536, 576] plus the LM head [576, 49152], random weights, chained in one jitted function, for
each native weight dtype in rotating order (``--variants`` names the dtypes, e.g. ``native-f16
native-q8_0``; the reference has no packed GEMM).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

VARIANTS = {"reference": ("reference", "f32"), "native-f32": ("native", "f32"),
            "native-f16": ("native", "f16"), "native-q8_0": ("native", "q8_0")}


def gemm_only(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The ``--gemm-only`` rounds: one JSON line per S (the GEMMs' M)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ops import backend

    d, f, v, layers, qkv = 576, 1536, 49152, 30, 960  # SmolLM2-135M
    rng = np.random.default_rng(0)

    def weight(k: int, n: int) -> jax.Array:
        return jnp.asarray(rng.standard_normal((k, n), np.float32) / np.sqrt(k))

    raw = [(weight(d, qkv), weight(d, d), weight(d, 2 * f), weight(f, d)) for _ in range(layers)]
    head = weight(d, v)
    weights: dict[str, Any] = {}
    linear = None
    for name in args.variants:
        if name == "reference":
            continue
        lb = backend.get_linear_fn("native", VARIANTS[name][1])
        assert lb is not None
        linear = lb.linear
        weights[name] = ([tuple(lb.pack(w) for w in layer) for layer in raw], lb.pack(head))
    assert linear is not None, "--gemm-only needs a native variant"
    del raw, head

    def step(x: jax.Array, packed: list[tuple[jax.Array, ...]], lm: jax.Array) -> jax.Array:
        for w_qkv, w_o, w_gu, w_down in packed:
            x = x + linear(linear(x, w_qkv)[:, :d], w_o)
            gu = linear(x, w_gu)
            x = x + 0.01 * linear(gu[:, :f] * gu[:, f:], w_down)
        return linear(x, lm)

    fn = jax.jit(step)
    rows = []
    for n in args.seqs:
        x = jnp.asarray(rng.standard_normal((n, d), np.float32))
        for w in weights.values():
            jax.block_until_ready(fn(x, *w))
        wall: dict[str, list[float]] = {k: [] for k in weights}
        names = list(weights)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                jax.block_until_ready(fn(x, *weights[name]))
                wall[name].append(time.perf_counter() - t0)
        row: dict[str, Any] = {"gemm_only": True, "m": n, "rounds": args.rounds}
        for k, times in wall.items():
            row[f"{k}_median_ms"] = round(1e3 * statistics.median(times), 2)
            row[f"{k}_min_ms"] = round(1e3 * min(times), 2)
            if args.baseline in wall and k != args.baseline:
                row[f"{k}_speedup"] = round(statistics.median(wall[args.baseline])
                                            / statistics.median(times), 2)
                row[f"{k}_speedup_min"] = round(min(wall[args.baseline]) / min(times), 2)
        row["isa"] = os.environ.get("XLASERVE_CPU_ISA") or "host"
        row["loadavg"] = os.getloadavg()[0]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--seqs", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--baseline", default="reference", choices=list(VARIANTS),
                    help="the variant the speed-ups are against")
    ap.add_argument("--isa", default=None, help="force a native build (sets XLASERVE_CPU_ISA)")
    ap.add_argument("--gemm-only", action="store_true",
                    help="time a decode step's GEMMs alone (SmolLM2 shapes), not the engine")
    ap.add_argument("--kv-cache-dtypes", nargs="+", default=["auto"],
                    choices=("auto", "float16", "bfloat16", "float32"),
                    help="run each variant with each of these KV-cache dtypes")
    args = ap.parse_args(argv)
    if args.isa:
        os.environ["XLASERVE_CPU_ISA"] = args.isa
    if args.gemm_only:
        return gemm_only(args)

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
            if args.baseline in llms and k != args.baseline:
                row[f"{k}_speedup"] = round(med[args.baseline] / med[k], 2)
                row[f"{k}_speedup_min"] = round(min(wall[args.baseline]) / min(wall[k]), 2)
                row[f"{k}_speedup_cpu_time"] = round(cmed[args.baseline] / cmed[k], 2)
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
