"""Offline engine throughput vs transformers ``generate``, side by side in one run.

    .venv/bin/python -m bench.offline_throughput                  # SmolLM2 f32, 1/8/32 seqs
    .venv/bin/python -m bench.offline_throughput --no-peer --concurrency 32

For each concurrency c: c distinct chat prompts, 128 output tokens each (ignore_eos), greedy.
Reports aggregate output tok/s (prefill included), the mean decode-step time once every sequence
is decoding, the time to each request's first token (TTFT, from when the level's requests are
all added), and the same for transformers+torch (run from .venv-ref in a subprocess, 2 threads).
A random-weight Llama-3-8B-shaped model (``--random-weights llama3-8b``) serves the GPU check,
which also asks for the compile time of every bucket cold and warm (``--compile-cache DIR``: a
fresh persistent cache, filled by the first engine, read by a second one built afterwards).
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
TOPICS = ["the sea", "a lighthouse", "autumn", "a robot", "the moon", "a city at night",
          "mountains", "a library", "rain", "a train journey", "coffee", "an old map",
          "the desert", "a garden", "winter", "a violin", "the stars", "a market", "a river",
          "snow", "a bridge", "the forest", "a storm", "a cat", "the ocean floor", "a clock",
          "a festival", "a volcano", "a kite", "the harbor", "a letter", "a dream"]


def prompts(n: int) -> list[str]:
    return [f"Request {i}: write a long story about {TOPICS[i % len(TOPICS)]}." for i in range(n)]


def run_xlaserve(args: argparse.Namespace, levels: list[int]) -> list[dict[str, Any]]:
    from serving.engine.llm import LLM
    from serving.engine.sampling_params import SamplingParams
    kw: dict[str, Any] = dict(dtype=args.dtype, max_model_len=args.max_model_len,
                              max_num_seqs=max(levels), block_size=args.block_size)
    if args.max_num_batched_tokens:
        kw["max_num_batched_tokens"] = args.max_num_batched_tokens
    kw["attention_backend"] = args.attention_backend
    if args.compile_cache:  # a private cache: the first engine's compile is cold
        kw.update(compilation_cache=True, cache_dir=args.compile_cache)
    if args.random_weights:
        from bench.random_models import random_loaded
        kw["loaded"] = random_loaded(args.random_weights, args.dtype, args.attention_backend)
    t0 = time.perf_counter()
    llm = LLM(args.model, **kw)
    startup = time.perf_counter() - t0
    tok = llm.tokenizer
    texts = prompts(max(levels) if not args.num_prompts else args.num_prompts)
    if args.input_len:  # fixed-length random prompts (random-weight models)
        import random
        rng = random.Random(0)
        v = llm.engine.model_config.vocab_size
        ids = [[rng.randrange(v) for _ in range(args.input_len)] for _ in texts]
    elif getattr(tok, "chat_template", None):
        ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}],
                                                  add_generation_prompt=True, tokenize=False),
                          add_special_tokens=False) for t in texts]
    else:
        ids = [tok.encode(t) for t in texts]
    p = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    eng = llm.engine
    llm.generate(ids[:2], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    rows = []
    for c in levels:
        batch = ids[:c] if not args.num_prompts else ids
        for i, x in enumerate(batch):
            spec = llm.processor.sampling_request(f"b{c}-{i}", x, p)
            llm.outputs.add(spec)
            eng.add_request(spec)
        decode_times: list[float] = []
        ttft: dict[str, float] = {}
        n_out = 0
        t0 = time.perf_counter()
        while eng.has_work:
            ts = time.perf_counter()
            sched_all_decode = all(len(s.tokens) - s.num_computed == 1
                                   for s in eng.scheduler.running) and not eng.scheduler.waiting
            running = len(eng.scheduler.running)
            # The step and its text (detokenization), as a request sees them.
            outs = llm.outputs.process(eng.step()).outputs
            if sched_all_decode and running == min(c, len(batch)):
                decode_times.append(time.perf_counter() - ts)
            now = time.perf_counter() - t0
            for o in outs:
                if o.request_id not in ttft and any(d.token_ids for d in o.outputs):
                    ttft[o.request_id] = now
            n_out += sum(len(d.token_ids) for o in outs for d in o.outputs)
        dt = time.perf_counter() - t0
        firsts = sorted(ttft.values())
        step = sum(decode_times) / max(1, len(decode_times))
        rows.append({"system": "xlaserve", "concurrency": c, "requests": len(batch),
                     "output_tokens": n_out, "seconds": dt, "tok_per_s": n_out / dt,
                     "decode_step_ms": 1e3 * step, "decode_tok_per_s": c / step if step else 0,
                     "ttft_mean_ms": 1e3 * sum(firsts) / max(1, len(firsts)),
                     "ttft_max_ms": 1e3 * firsts[-1] if firsts else 0.0,
                     "startup_s": startup, "compile_s": eng.compile_seconds,
                     "recompiles": eng.runner.num_recompiles})
        print(json.dumps(rows[-1]), flush=True)
    if args.compile_cache:
        cold = dict(eng.runner.compile_seconds), eng.compile_seconds
        del llm, eng  # the second engine needs the memory
        rows.append(compile_times(*cold, kw, args))
    return rows


def compile_times(cold: dict[int, float], cold_total: float, kw: dict[str, Any],
                  args: argparse.Namespace) -> dict[str, Any]:
    """Every bucket's compile time cold (``cold``: the first engine's, on a fresh cache) and warm
    (a second engine built now, once the first is dropped, reading the cache it filled)."""
    import gc

    from serving.engine.llm import LLM
    kw.pop("loaded", None)
    gc.collect()
    if args.random_weights:
        from bench.random_models import random_loaded
        kw["loaded"] = random_loaded(args.random_weights, args.dtype, args.attention_backend)
    warm_engine = LLM(args.model, **kw).engine
    row = {"system": "xlaserve", "compile_cold_s": cold_total,
           "compile_warm_s": warm_engine.compile_seconds,
           "buckets": {str(t): {"cold_s": cold[t], "warm_s": warm_engine.runner.compile_seconds[t]}
                       for t in cold}}
    print(json.dumps(row), flush=True)
    return row


def run_peer(args: argparse.Namespace, levels: list[int]) -> list[dict[str, Any]]:
    from models.assets import fetch
    py = REPO / ".venv-ref" / "bin" / "python"
    if not py.exists():
        print("peer skipped: .venv-ref (torch) missing; see scripts/README.md", file=sys.stderr)
        return []
    pj = Path("/tmp/xlaserve_bench_prompts.json")
    pj.write_text(json.dumps(prompts(max(levels))))
    cmd = [str(py), str(REPO / "bench" / "hf_generate.py"), "--gguf",
           str(fetch("smollm2-135m-instruct")), "--batches", ",".join(map(str, levels)),
           "--new-tokens", str(args.output_len), "--prompts-json", str(pj)]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    rows = []
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            d = json.loads(line)
            rows.append({"system": "transformers", "concurrency": d["batch"],
                         "output_tokens": d["new_tokens"], "seconds": d["seconds"],
                         "tok_per_s": d["tok_per_s"]})
            print(json.dumps(rows[-1]), flush=True)
    if proc.returncode:
        print(proc.stderr[-2000:], file=sys.stderr)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-prompts", type=int, default=None)
    ap.add_argument("--random-weights", default=None, help="e.g. llama3-8b (bench/random_models)")
    ap.add_argument("--input-len", type=int, default=None, help="random prompts of this length")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--compile-cache", default=None,
                    help="fresh directory: also report every bucket's compile time cold/warm")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    rows = run_xlaserve(args, levels)
    if not args.no_peer and not args.random_weights:
        rows += run_peer(args, levels)
    print("\n| system | concurrency | output tok/s | decode step (ms) |")
    print("|---|---|---|---|")
    for r in rows:
        if "concurrency" not in r:  # the compile-time row
            continue
        step = f"{r['decode_step_ms']:.1f}" if "decode_step_ms" in r else "-"
        print(f"| {r['system']} | {r['concurrency']} | {r['tok_per_s']:.1f} | {step} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
