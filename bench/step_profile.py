"""Where an engine decode step's time goes, from XLA's own per-op trace (not ablations).

    .venv/bin/python -m bench.step_profile --seqs 32 --prompt-len 100

Runs the real engine (SmolLM2 f32 by default) with ``--seqs`` greedy requests until they all
decode, then records ``--steps`` engine steps with ``jax.profiler``. Every XLA:CPU thunk of the
step executable's top-level computation is classed by what the compiled HLO says it is:

- projections: the dot fusions of the layers (qkv, o, gate/up, down);
- LM head: the dot fusion whose output is ``[S, V]``;
- attention: the ``while`` loops of the paged attention (their bodies run inside them) and the
  fusions tagged with the attention op in their HLO metadata;
- KV write: the scatters;
- other device work: norms, rope, residual adds, copies;
- sampler: the greedy argmax over ``[S, V]`` logits, timed on its own;
- host: the engine step's wall time minus the device time above (scheduling, input padding,
  dispatch, detokenization).

A benchmark, not a test: it prints a table and asserts nothing. Take numbers on an idle machine.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time
from typing import Any

import jax


def hlo_ops(hlo: str) -> dict[str, tuple[str, str, str]]:
    """Top-level (ENTRY) instruction name → (output shape, opcode, op_name metadata)."""
    ops: dict[str, tuple[str, str, str]] = {}
    entry = hlo[hlo.index("\nENTRY "):]
    body = entry[: entry.index("\n}")]
    for line in body.splitlines()[1:]:
        # The shape may be a tuple with spaces ("(s32[], f32[..]) while(...)"): the opcode is
        # the first " word(" after the "=".
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (.*?) ([\w-]+)\(", line)
        if m:
            meta = re.search(r'op_name="([^"]*)"', line)
            target = re.search(r'custom_call_target="([^"]*)"', line)  # native kernels
            ops[m.group(1)] = (m.group(2), m.group(3), " ".join(
                x.group(1) for x in (meta, target) if x))
    return ops


def classify(name: str, op: tuple[str, str, str], vocab: int) -> str:
    shape, opcode, meta = op
    if opcode == "while" or "attention" in meta:  # incl. the native kernel's custom call
        return "attention"
    if "scatter" in name or "scatter" in opcode:
        return "KV write"
    if name.startswith(("ynn_fusion", "xnn_fusion", "onednn")) or opcode in ("dot", "custom-call"):
        return "LM head" if re.search(rf"\[\d+,{vocab}\]", shape) else "projections"
    return "other device work"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=100)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--cpu-weight-dtype", default="f16")
    args = ap.parse_args()

    from serving.engine.llm import LLM
    from serving.engine.sampling_params import SamplingParams

    llm = LLM(args.model, dtype="float32", max_model_len=1024, max_num_seqs=args.seqs,
              attention_backend=args.attention_backend, cpu_weight_dtype=args.cpu_weight_dtype)
    eng = llm.engine
    runner = eng.runner
    vocab = eng.model_config.vocab_size
    for i in range(args.seqs):
        eng.add_request(llm.processor.sampling_request(
            f"p{i}", [1 + (i * 7 + j) % 1000 for j in range(args.prompt_len)],
            SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)))
    while eng.scheduler.waiting or any(s.num_computed < s.prompt_len
                                       for s in eng.scheduler.running):
        eng.step()
    for _ in range(5):
        eng.step()

    t_bucket = runner.bucket(args.seqs)
    ops = hlo_ops(runner.step_hlo(t_bucket))

    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            eng.step()
        wall = (time.perf_counter() - t0) / args.steps * 1e3
        jax.profiler.stop_trace()
        path = glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)[0]
        with gzip.open(path) as f:
            events: list[dict[str, Any]] = json.load(f)["traceEvents"]

    parts: collections.defaultdict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("ph") != "X":
            continue
        name = e["name"]
        if name in ops:
            parts[classify(name, ops[name], vocab)] += e["dur"] / 1e3 / args.steps
    rows = runner.cfg.num_seq_rows(t_bucket)
    argmax = runner._exe[("argmax", rows)]
    logits = jax.numpy.zeros((rows, vocab), jax.numpy.float32)
    jax.block_until_ready(argmax(logits))
    times = []
    for _ in range(10):
        t = time.perf_counter()
        jax.block_until_ready(argmax(logits))
        times.append((time.perf_counter() - t) * 1e3)
    parts["sampler (greedy argmax)"] = sorted(times)[len(times) // 2]
    device = sum(parts.values())
    parts["host (schedule, pad inputs, dispatch, update)"] = max(0.0, wall - device)
    print(f"\nengine decode step, {args.seqs} sequences, context ~{args.prompt_len + 5}-"
          f"{args.prompt_len + 5 + args.steps}, T bucket {t_bucket} "
          f"(jax {jax.__version__}, {jax.devices()[0].platform}): {wall:.1f} ms")
    print("| part | ms | share |\n|---|---|---|")
    for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {v:.1f} | {v / wall:.0%} |")


if __name__ == "__main__":
    main()
