"""What grammar masks cost: the decode step at N sequences constrained against free, and the
time to first token a cached grammar adds. On the real engine, in this process.

    .venv/bin/python -m bench.structured_bench                   # SmolLM2 f32, 32 seqs
    .venv/bin/python -m bench.structured_bench --seqs 4 --output-len 8 --rounds 1   # a smoke run

Decode step: each round runs the three settings in turn (interleaved A/B: ``free``, ``json``, a
schema without string-length limits (an object holding a list of at least 64 strings, so that
no request ends early), and ``json-len``, the same with ``minLength``/``maxLength``), each
as ``--seqs`` concurrent requests of ``--output-len`` tokens. A step is timed around the whole
``LLMEngine.step()`` (schedule, model step, host mask fill, sampler, matcher updates), and only
the steps in which every sequence decodes count. Reports, per setting, the median over all
rounds and the median step's overhead against ``free``.

TTFT: one request at a time, alternating free and constrained (grammar already in the cache),
from building the engine request (validation, grammar lookup) to its first token; medians and
the difference.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from typing import Any

import numpy as np

from bench.offline_throughput import prompts
from serving.engine.llm import LLM
from serving.engine.sampling_params import SamplingParams, StructuredSpec

# A list of lines: at least LINES strings, so no constrained request can end before
# --output-len and every step counts (a free-form object let most end after ~20 tokens).
LINES = 64
STORY = {"type": "object", "properties": {"lines": {
    "type": "array", "minItems": LINES, "items": {"type": "string"}}},
    "required": ["lines"]}
STORY_LEN = {"type": "object", "properties": {"lines": {
    "type": "array", "minItems": LINES,
    "items": {"type": "string", "minLength": 1, "maxLength": 40}}},
    "required": ["lines"]}
SETTINGS: dict[str, StructuredSpec | None] = {
    "free": None,
    "json": StructuredSpec("json", json.dumps(STORY)),
    "json-len": StructuredSpec("json", json.dumps(STORY_LEN)),
}


def decode_steps(llm: LLM, ids: list[list[int]], spec: StructuredSpec | None, output_len: int,
                 tag: str) -> list[float]:
    """Wall time of every engine step in which all of ``ids`` decode."""
    eng = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True,
                            structured=spec)
    for i, x in enumerate(ids):
        req = llm.processor.sampling_request(f"{tag}-{i}", x, params)
        llm.outputs.add(req)
        eng.add_request(req)
    out = []
    while eng.has_work:
        sched = eng.scheduler
        all_decode = (len(sched.running) == len(ids) and not sched.waiting
                      and all(len(q.tokens) - q.num_computed == 1 for q in sched.running))
        t0 = time.perf_counter()
        llm.outputs.process(eng.step())
        if all_decode:
            out.append(time.perf_counter() - t0)
    return out


def ttft(llm: LLM, ids: list[int], spec: StructuredSpec | None, tag: str) -> float:
    eng = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=1, structured=spec)
    t0 = time.perf_counter()
    eng.add_request(llm.processor.sampling_request(tag, ids, params))
    while eng.has_work:
        if any(o.new_token_ids for o in eng.step()):
            dt = time.perf_counter() - t0
            while eng.has_work:
                eng.step()
            return dt
    raise RuntimeError("no token")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ttft-requests", type=int, default=20)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    llm = LLM(args.model, dtype="float32", max_model_len=1024, max_num_seqs=args.seqs)
    tok = llm.tokenizer
    ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                              add_generation_prompt=True),
                      add_special_tokens=False) for t in prompts(args.seqs)]
    for spec in SETTINGS.values():  # warm: every grammar compiled and cached, one short run
        decode_steps(llm, ids[:2], spec, 4, "warm")
    steps: dict[str, list[float]] = defaultdict(list)
    for r in range(args.rounds):
        for name, spec in SETTINGS.items():
            steps[name] += decode_steps(llm, ids, spec, args.output_len, f"{name}-{r}")
    free = float(np.median(steps["free"]))
    rows: list[dict[str, Any]] = []
    for name in SETTINGS:
        med = float(np.median(steps[name]))
        rows.append({"seqs": args.seqs, "setting": name, "step_ms": round(1e3 * med, 2),
                     "overhead": round(med / free - 1, 4), "steps": len(steps[name])})
        print(json.dumps(rows[-1]), flush=True)
    first: dict[str, list[float]] = defaultdict(list)
    for i in range(args.ttft_requests):
        for name in ("free", "json"):
            first[name].append(ttft(llm, ids[i % len(ids)], SETTINGS[name], f"ttft-{name}-{i}"))
    med = {k: float(np.median(v)) for k, v in first.items()}
    row = {"ttft_free_ms": round(1e3 * med["free"], 2), "ttft_json_ms": round(1e3 * med["json"], 2),
           "ttft_added_ms": round(1e3 * (med["json"] - med["free"]), 2),
           "recompiles": llm.engine.runner.num_recompiles}
    rows.append(row)
    print(json.dumps(row), flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
