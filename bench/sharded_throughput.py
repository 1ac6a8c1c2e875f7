"""Offline decode throughput at several tensor-parallel sizes on simulated CPU devices.

    python -m bench.sharded_throughput                                  # SmolLM2: tp 1 and 3
    python -m bench.sharded_throughput --model gemma3-270m --tp 1,2

A sanity check that the sharded path adds no pathological overhead, not a speed target: the
simulated devices of one CPU share its cores (2 here), so tp > 1 can only add the cost of the
collectives and of splitting each matmul into smaller ones. Each tp runs in its own process
(``XLA_FLAGS=--xla_force_host_platform_device_count=<tp>``): c chat prompts decoded greedily for
``--output-len`` tokens each (ignore_eos), after a warm-up request. Reports aggregate output tok/s
(prefill included) and the mean decode-step time once every sequence is decoding.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def one(model: str, tp: int, concurrency: int, output_len: int) -> dict[str, Any]:
    from serving.engine.llm import LLM
    from serving.engine.sampling_params import SamplingParams
    t0 = time.perf_counter()
    llm = LLM(model, tensor_parallel_size=tp, dtype="float32", max_model_len=512,
              max_num_seqs=concurrency, max_num_batched_tokens=256)
    startup = time.perf_counter() - t0
    tok, eng = llm.tokenizer, llm.engine
    texts = [f"Request {i}: write a long story about the sea." for i in range(concurrency)]
    ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                              add_generation_prompt=True),
                      add_special_tokens=False) if tok.chat_template else tok.encode(t)
           for t in texts]
    llm.generate(ids[:1], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    p = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    for i, x in enumerate(ids):
        spec = llm.processor.sampling_request(f"b{i}", x, p)
        llm.outputs.add(spec)
        eng.add_request(spec)
    steps: list[float] = []
    n_out = 0
    t0 = time.perf_counter()
    while eng.has_work:
        all_decode = not eng.scheduler.waiting and all(
            len(s.tokens) - s.num_computed == 1 for s in eng.scheduler.running)
        running = len(eng.scheduler.running)
        ts = time.perf_counter()
        outs = llm.outputs.process(eng.step()).outputs
        if all_decode and running == concurrency:
            steps.append(time.perf_counter() - ts)
        n_out += sum(len(d.token_ids) for o in outs for d in o.outputs)
    dt = time.perf_counter() - t0
    step = sum(steps) / max(1, len(steps))
    return {"model": model, "tp": tp, "concurrency": concurrency, "output_tokens": n_out,
            "tok_per_s": round(n_out / dt, 1), "decode_step_ms": round(1e3 * step, 1),
            "startup_s": round(startup, 1), "recompiles": eng.runner.num_recompiles}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tp", default="1,3")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(one(args.model, args.child, args.concurrency, args.output_len)))
        return
    rows = []
    for tp in (int(x) for x in args.tp.split(",")):
        env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={tp}"}
        proc = subprocess.run([sys.executable, "-m", "bench.sharded_throughput", "--model",
                               args.model, "--concurrency", str(args.concurrency),
                               "--output-len", str(args.output_len), "--child", str(tp)],
                              env=env, capture_output=True, text=True, check=False, cwd=REPO)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| model | tp | concurrency | output tok/s | decode step (ms) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['tp']} | {r['concurrency']} | {r['tok_per_s']} | "
              f"{r['decode_step_ms']} |")


if __name__ == "__main__":
    main()
