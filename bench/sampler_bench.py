"""The sampler's share of a decode step, per sampling setting, on the real engine.

    .venv/bin/python -m bench.sampler_bench                       # SmolLM2 f32, 1 and 32 seqs
    .venv/bin/python -m bench.sampler_bench --seqs 32 --settings top-p

For each number of sequences and each setting, the engine decodes ``--output-len`` tokens for that
many chat prompts (ignore_eos). Each executable is timed to completion (``block_until_ready``)
around its own call: the model step and the sampler (``sample``, or ``argmax`` for greedy). Reports
medians over the steps in which every sequence decodes, and the sampler's share of step + sampler.
It also replays the logits of those steps through the top-p filter in numpy to count how often a
nucleus is wider than the sampler's ``CANDIDATES`` (the rows that take the exact bisection).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from typing import Any

import jax
import numpy as np

from bench.offline_throughput import prompts
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--seqs", default="1,32")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
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
            sampler_name = "argmax" if name == "greedy" else "sample"
            samp = 1e3 * float(np.median(decode[sampler_name]))
            row = {"seqs": s, "setting": name, "step_ms": round(step, 2),
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
