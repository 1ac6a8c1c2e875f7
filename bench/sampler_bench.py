"""The sampler's share of a decode step, per sampling setting, on the real engine.

    .venv/bin/python -m bench.sampler_bench                       # SmolLM2 f32, 1 and 32 seqs
    .venv/bin/python -m bench.sampler_bench --seqs 32 --settings top-p
    git show 0f558d2^:serving/engine/sampler.py > /tmp/old_sampler.py
    .venv/bin/python -m bench.sampler_bench --synthetic --baseline-sampler /tmp/old_sampler.py

For each number of sequences and each setting, the engine decodes ``--output-len`` tokens for that
many chat prompts (ignore_eos). Each executable is timed to completion (``block_until_ready``)
around its own call: the model step and the sampler (``draw``, ``sample`` with penalties or
logprobs, ``argmax`` for greedy). Reports
medians over the steps in which every sequence decodes, and the sampler's share of step + sampler.
It also replays the logits of those steps through the top-p filter in numpy to count how often a
nucleus is wider than the sampler's ``CANDIDATES`` (the rows that take the exact bisection).

``--synthetic`` times the sampler alone instead, on [32, 49152] logits drawn from N(0, 2.5²)
(far flatter than a model's: every top-p row is wider than the candidates), or with
``--peaked`` from N(0, 1.5²) with 40 tokens a row raised by 6-14 (every top-p 0.95 nucleus inside
the candidates, as most of a model's are), medians of 15 calls, beside another sampler module
given by ``--baseline-sampler`` (a file with the same ``sample``, ``Sampling`` and
``SamplingFlags``), alternating between the two. Settings the runner sends to ``draw`` (no
penalties, no logprobs) also time ``draw``, with ``lax.top_k`` and with the native top-k kernel
(where this host has it); each row also gives the minimum over the calls (a loaded machine's
least disturbed call).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import sys
import time
from collections import defaultdict
from typing import Any

import jax
import numpy as np

from bench.offline_throughput import prompts
from ops import native
from serving.engine import sampler as current
from serving.engine.llm import LLM
from serving.engine.sampler import CANDIDATES
from serving.engine.sampling_params import SamplingParams

SETTINGS: dict[str, dict[str, Any]] = {
    "greedy": dict(temperature=0.0),
    "temperature": dict(temperature=0.8),
    "top-p": dict(temperature=0.8, top_p=0.95),
    "top-k+min-p": dict(temperature=0.8, top_k=50, min_p=0.05),
    "penalties": dict(temperature=0.8, top_p=0.95, presence_penalty=0.5,
                      frequency_penalty=0.5, repetition_penalty=1.1),
    "logprobs": dict(temperature=0.8, top_p=0.95, logprobs=5),
}


def timed(exe: Any, name: str, times: dict[str, list[float]], keep: list[Any] | None) -> Any:
    def run(*args: Any) -> Any:
        t0 = time.perf_counter()
        out = jax.block_until_ready(exe(*args))
        times[name].append(time.perf_counter() - t0)
        if keep is not None:
            keep.append(np.array(out[1], copy=True))  # the step's logits [S, V] (a copy: a
            # view would hold the device buffer)
        return out
    return run


def wide_nuclei(logits: list[np.ndarray], seqs: int, temperature: float, top_p: float) -> float:
    """Share of rows whose top-p nucleus is wider than CANDIDATES."""
    wide = total = 0
    for lg in logits:
        y = lg[:seqs].astype(np.float64) / temperature
        p = np.exp(y - y.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        ps = -np.sort(-p, axis=-1)
        size = ((np.cumsum(ps, -1) - ps) < top_p).sum(-1)
        wide += int((size > CANDIDATES).sum())
        total += size.shape[0]
    return wide / max(total, 1)


SYNTHETIC: dict[str, dict[str, Any]] = {
    "temperature": dict(temperature=0.8),
    "top-p 0.95": dict(temperature=0.8, top_p=0.95),
    "top-p 0.5": dict(temperature=0.8, top_p=0.5),
    "top-k 50, min-p 0.05": dict(temperature=0.8, top_k=50, min_p=0.05),
    "top-k 500": dict(temperature=0.8, top_k=500),
    "top-p 0.95 + penalties": dict(temperature=0.8, top_p=0.95, penalties=True),
    "temperature + logprobs": dict(temperature=0.8, logprobs=True),
}


def synthetic_inputs(mod: Any, s: int, v: int, rng: np.random.Generator, *,
                     temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                     min_p: float = 0.0, penalties: bool = False, logprobs: bool = False) -> Any:
    def rows(x: float, dtype: Any) -> np.ndarray:
        return np.full(s, x, dtype)
    flags = mod.SamplingFlags(*(np.asarray(b) for b in (
        temperature > 0, top_k > 0 or top_p < 1 or min_p > 0, penalties, False, logprobs,
        False)))
    return mod.Sampling(
        temperature=rows(temperature, np.float32), top_k=rows(top_k, np.int32),
        top_p=rows(top_p, np.float32), min_p=rows(min_p, np.float32),
        presence=rows(0.5 if penalties else 0.0, np.float32),
        frequency=rows(0.5 if penalties else 0.0, np.float32),
        repetition=rows(1.1 if penalties else 1.0, np.float32),
        seeds=np.arange(s, dtype=np.uint32), counters=rows(3, np.int32),
        bias_ids=np.full((s, 8), -1, np.int32), bias_vals=np.zeros((s, 8), np.float32),
        history=rng.integers(0, v, (s, 1024)).astype(np.int32), prompt_lens=rows(100, np.int32),
        mask=np.full((s, -(-v // 32)), -1, np.int32), flags=flags)


def run_synthetic(baseline: str | None, peaked: bool = False) -> list[dict[str, Any]]:
    s, v = 32, 49152
    rng = np.random.default_rng(0)
    if peaked:
        x = (rng.standard_normal((s, v)) * 1.5).astype(np.float32)
        for r in range(s):
            x[r, rng.integers(0, v, 40)] += rng.uniform(6, 14, 40).astype(np.float32)
    else:
        x = (rng.standard_normal((s, v)) * 2.5).astype(np.float32)
    logits = jax.numpy.asarray(x)
    kernels = native.kernels()
    mods = {"current": current}
    if baseline:
        spec = importlib.util.spec_from_file_location("baseline_sampler", baseline)
        assert spec is not None and spec.loader is not None
        mods["baseline"] = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mods["baseline"])

    rows = []
    for name, kw in SYNTHETIC.items():
        row: dict[str, Any] = {"setting": name}
        fns: dict[str, tuple[Any, Any]] = {}
        for label, mod in mods.items():
            si = jax.device_put(synthetic_inputs(mod, s, v, rng, **kw))
            fns[label] = (jax.jit(mod.sample), si)
            if label == "current" and not (kw.get("penalties") or kw.get("logprobs")):
                filtered = bool(si.flags.filter)  # the runner's choice of executable
                fns["draw"] = (jax.jit(functools.partial(current.draw, filtered=filtered)), si)
                if kernels is not None and filtered:
                    fns["draw_native"] = (jax.jit(functools.partial(
                        current.draw, top_k=kernels.top_k)), si)
        times: dict[str, list[float]] = defaultdict(list)
        for fn, si in fns.values():
            jax.block_until_ready(fn(logits, si))
        for _ in range(15):  # interleaved: a load change hits every executable alike
            for label, (fn, si) in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(logits, si))
                times[label].append(time.perf_counter() - t0)
        for label, ts in times.items():
            row[f"{label}_ms"] = round(1e3 * float(np.median(ts)), 2)
            row[f"{label}_min_ms"] = round(1e3 * min(ts), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--seqs", default="1,32")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--synthetic", action="store_true", help="the sampler alone (see above)")
    ap.add_argument("--baseline-sampler", default=None, help="with --synthetic: a sampler.py")
    ap.add_argument("--peaked", action="store_true", help="with --synthetic: model-like logits")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    if args.synthetic:
        rows = run_synthetic(args.baseline_sampler, args.peaked)
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump({"cpu": cpu_name(), "rows": rows}, f, indent=1)
        return
    levels = [int(x) for x in args.seqs.split(",")]
    llm = LLM(args.model, dtype="float32", max_model_len=1024, max_num_seqs=max(levels))
    eng, runner, tok = llm.engine, llm.engine.runner, llm.tokenizer
    ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                              add_generation_prompt=True),
                      add_special_tokens=False) for t in prompts(max(levels))]
    llm.generate(ids[:2], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    rows = []
    for s in levels:
        for name in args.settings.split(","):
            times: dict[str, list[float]] = defaultdict(list)
            logits: list[np.ndarray] = []
            saved = dict(runner._exe)
            for key, exe in saved.items():
                keep = logits if key[0] == "step" and name == "top-p" else None
                runner._exe[key] = timed(exe, key[0], times, keep)
            params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, seed=0,
                                    **SETTINGS[name])
            decode: dict[str, list[float]] = defaultdict(list)
            for i, x in enumerate(ids[:s]):
                spec = llm.processor.sampling_request(f"{name}-{s}-{i}", x, params)
                llm.outputs.add(spec)
                eng.add_request(spec)
            while eng.has_work:
                all_decode = (len(eng.scheduler.running) == s and not eng.scheduler.waiting
                              and all(len(q.tokens) - q.num_computed == 1
                                      for q in eng.scheduler.running))
                for v in times.values():
                    v.clear()
                llm.outputs.process(eng.step())
                if all_decode:
                    for k, v in times.items():
                        decode[k] += v
            runner._exe.update(saved)
            step = 1e3 * float(np.median(decode["step"]))
            # plain sampled steps run ``draw`` (``draw_unfiltered`` without filters), those with
            # penalties or logprobs ``sample``
            sampler_name = "argmax" if name == "greedy" else next(
                k for k in ("draw", "draw_unfiltered", "sample") if decode[k])
            samp = 1e3 * float(np.median(decode[sampler_name]))
            row = {"seqs": s, "setting": name, "sampler": sampler_name, "step_ms": round(step, 2),
                   "sampler_ms": round(samp, 2),
                   "sampler_p90_ms": round(1e3 * float(np.percentile(decode[sampler_name], 90)), 2),
                   "share": round(samp / (step + samp), 4), "steps": len(decode["step"]),
                   "recompiles": runner.num_recompiles}
            if name == "top-p":
                row["wide_nucleus_rows"] = round(wide_nuclei(logits, s, 0.8, 0.95), 4)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"cpu": cpu_name(), "rows": rows}, f, indent=1)


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
