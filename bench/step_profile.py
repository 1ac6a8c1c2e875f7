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
- sampler: every other executable the steps ran (argmax, or the sampler with ``--sampling
  top-p``: temperature 0.8, top-p 0.95), each run's whole time from the trace;
- host: the engine step's wall time minus the device time above (scheduling, input padding,
  dispatch, detokenization).

Each part also gets its floor on this machine (``--no-roofline`` skips it): the time it would
take at the measured memory bandwidth or f32 GEMM peak (``machine_limits``), whichever is
longer, for the bytes it must read (weights at their stored width, the KV cache it attends
over, the logits) and the flops it must do; "of floor" is floor / measured.

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
    ap.add_argument("--sampling", choices=("greedy", "top-p"), default="greedy")
    ap.add_argument("--no-roofline", action="store_true")
    ap.add_argument("--kv-cache-dtype", default="auto",
                    choices=("auto", "float16", "bfloat16", "float32"))
    args = ap.parse_args()

    from serving.engine.llm import LLM
    from serving.engine.sampling_params import SamplingParams

    llm = LLM(args.model, dtype="float32", max_model_len=1024, max_num_seqs=args.seqs,
              attention_backend=args.attention_backend, cpu_weight_dtype=args.cpu_weight_dtype,
              kv_cache_dtype=args.kv_cache_dtype)
    eng = llm.engine
    runner = eng.runner
    vocab = eng.model_config.vocab_size
    for i in range(args.seqs):
        eng.add_request(llm.processor.sampling_request(
            f"p{i}", [1 + (i * 7 + j) % 1000 for j in range(args.prompt_len)],
            SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
            if args.sampling == "greedy" else
            SamplingParams(temperature=0.8, top_p=0.95, seed=i, max_tokens=200,
                           ignore_eos=True)))
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

    step_module = re.search(r"HloModule (\S+?),", runner.step_hlo(t_bucket))
    module_of_run = {e["args"]["run_id"]: e["args"]["hlo_module"] for e in events
                     if e.get("ph") == "X" and "hlo_module" in e.get("args", {})}
    parts: collections.defaultdict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("ph") != "X":
            continue
        name, eargs = e["name"], e.get("args", {})
        module = module_of_run.get(eargs.get("run_id"))
        if name in ops and module == (step_module and step_module.group(1)):
            parts[classify(name, ops[name], vocab)] += e["dur"] / 1e3 / args.steps
        elif name.startswith("ThunkExecutor::Execute") and module is not None and \
                module != (step_module and step_module.group(1)):
            parts["sampler"] += e["dur"] / 1e3 / args.steps
    device = sum(parts.values())
    parts["host (schedule, pad inputs, dispatch, update)"] = max(0.0, wall - device)
    context = args.prompt_len + 5 + args.steps // 2
    print(f"\nengine decode step, {args.seqs} sequences, {args.sampling}, context "
          f"~{args.prompt_len + 5}-{args.prompt_len + 5 + args.steps}, T bucket {t_bucket}, "
          f"{args.attention_backend} backend, "
          f"{args.cpu_weight_dtype} weights, {runner.kv[0][0].dtype.name} KV cache "
          f"(jax {jax.__version__}, "
          f"{jax.devices()[0].platform}): {wall:.1f} ms")
    floors = {} if args.no_roofline else roofline_floors(
        eng.model_config, args.seqs, context, args.cpu_weight_dtype, args.attention_backend,
        runner.kv[0][0].dtype.itemsize)
    print("| part | ms | share | floor ms | of floor |\n|---|---|---|---|---|")
    for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
        floor = floors.get(k.split(" (")[0])
        extra = f"{floor:.1f} | {floor / v:.0%}" if floor is not None and v > 0 else "- | -"
        print(f"| {k} | {v:.1f} | {v / wall:.0%} | {extra} |")
    if floors:
        total = sum(floors.values())
        print(f"| whole step | {wall:.1f} | 100% | {total:.1f} | {total / wall:.0%} |")


def machine_limits() -> tuple[float, float]:
    """(bytes/s, flop/s) this machine reaches, each the best of 5: bandwidth from a jitted f32
    sum over 512 MiB or the native GEMM at M=1 over 192 MiB of f16 weights (a pure stream),
    whichever reads faster; flops from a 2048-cube f32 product by XLA's dot or the native
    GEMM (when built), whichever is faster."""
    import jax.numpy as jnp

    def best(fn: Any, *xs: Any) -> float:
        jax.block_until_ready(fn(*xs))
        times = []
        for _ in range(5):
            t = time.perf_counter()
            jax.block_until_ready(fn(*xs))
            times.append(time.perf_counter() - t)
        return min(times)

    big = jnp.ones((128, 1 << 20), jnp.float32)
    bandwidth = big.nbytes / best(jax.jit(lambda a: jnp.sum(a, axis=1)), big)
    del big
    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    flops = 2 * n**3 / best(jax.jit(jnp.dot), a, a)
    from ops import native
    kernels = native.kernels()
    if kernels is not None:
        packed = native.pack_linear(a, jnp.float32)
        flops = max(flops, 2 * n**3 / best(jax.jit(kernels.linear), a, packed))
        stream = native.pack_linear(jnp.ones((2048, 49152), jnp.float32), jnp.float16)
        x = jnp.ones((1, 2048), jnp.float32)
        bandwidth = max(bandwidth, stream.nbytes / best(jax.jit(kernels.linear), x, stream))
    return bandwidth, flops


def roofline_floors(cfg: Any, seqs: int, context: int, weight_dtype: str, backend: str,
                    kv_itemsize: int = 4) -> dict[str, float]:
    """Milliseconds each part needs at least on this machine (see the module docstring);
    ``kv_itemsize``: bytes per cached value (2 with ``--kv-cache-dtype float16``)."""
    bandwidth, flops = machine_limits()
    print(f"machine: {bandwidth / 1e9:.1f} GB/s (f32 sum), {flops / 1e9:.0f} GFLOP/s (f32 GEMM)")
    d, f, v, layers = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    qkv_o = d * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim + \
        cfg.num_heads * cfg.head_dim * d
    proj_weights = layers * (qkv_o + 3 * d * f)
    width = 2 if weight_dtype == "f16" and backend != "reference" else 4

    def floor(weights: int) -> float:
        return max(weights * width / bandwidth, 2 * seqs * weights / flops) * 1e3

    kv_bytes = 2 * layers * cfg.num_kv_heads * cfg.head_dim * context * seqs * kv_itemsize
    return {"projections": floor(proj_weights), "LM head": floor(d * v),
            "attention": kv_bytes / bandwidth * 1e3, "sampler": seqs * v * 4 / bandwidth * 1e3}

if __name__ == "__main__":
    main()
