"""Model load time and peak RSS: orbax checkpoint vs HF safetensors vs GGUF.

    python -m bench.load_time                        # SmolLM2-135M and Gemma 3 270M, f32
    python -m bench.load_time --models smollm2-135m-instruct --repeats 3 --tp 2

For each model it prepares, once, under ``--work`` (default /tmp/xlaserve_loadbench):
``hf/`` an HF directory (config.json, tokenizer, model.safetensors with HF tensor names, written
from the GGUF's dequantised weights) and ``orbax/`` (``xlaserve-convert``). Then every format is
loaded ``--repeats`` times, each in a fresh process (cold JAX, warm page cache), through
``models.loader.load_model``: the time is ``load_model``'s own (every format's modules imported
beforehand), the peak RSS the process's ``VmHWM`` minus its RSS just before loading. With
``--tp N`` the weights go straight into an N-device mesh (simulated CPU devices), through the same
``place`` hook the engine uses.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, sys, time
spec, tp = sys.argv[1], int(sys.argv[2])
import jax
# Import every format's modules first: the timing is I/O, conversion and placement only.
import orbax.checkpoint, safetensors, transformers  # noqa
import models.gguf, models.orbax_source, models.tokenizer  # noqa
from models.loader import load_model
place = {}
if tp > 1:
    from sharding import Sharder, MeshShape, make_mesh
    place = {"place": Sharder(make_mesh(MeshShape(1, tp))).place}
jax.numpy.zeros(1).block_until_ready()
def status_mib(key):  # VmHWM is this process's own peak (ru_maxrss survives exec from the parent)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key)) / 1024
before = status_mib("VmRSS")
t0 = time.perf_counter()
loaded = load_model(spec, dtype="float32", progress=False, **place)
jax.block_until_ready(jax.tree_util.tree_leaves(loaded.model))
dt = time.perf_counter() - t0
peak = status_mib("VmHWM")
print(json.dumps({"seconds": dt, "peak_rss_mib": peak - before, "process_peak_mib": peak}))
"""


def prepare(alias: str, work: Path) -> dict[str, str]:
    """GGUF path, plus an HF safetensors dir and an orbax dir made from it (once)."""
    import numpy as np
    from safetensors.numpy import save_file

    from models.assets import fetch
    from models.gguf import load_gguf
    gguf = fetch(alias)
    hf, orbax = work / alias / "hf", work / alias / "orbax"
    if not (hf / "model.safetensors").exists():
        hf.mkdir(parents=True, exist_ok=True)
        g = load_gguf(gguf, progress=False)
        (hf / "config.json").write_text(json.dumps(g.hf_config, indent=1))
        (hf / "generation_config.json").write_text(json.dumps(g.generation_config))
        g.tokenizer.save_pretrained(str(hf))
        tensors = {name: np.ascontiguousarray(w, np.float32) for name, w in g.tensors(False)}
        save_file(tensors, str(hf / "model.safetensors"))
    if not (orbax / "xlaserve_checkpoint.json").exists():
        from serving.engine.convert import main as convert
        assert convert([str(gguf), "--output", str(orbax), "--dtype", "float32",
                        "--force"]) == 0
    return {"gguf": str(gguf), "safetensors": str(hf), "orbax": str(orbax)}


def measure(spec: str, tp: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    if tp > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={tp}"
    proc = subprocess.run([sys.executable, "-c", CHILD, spec, str(tp)], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def size_mib(path: str) -> float:
    p = Path(path)
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="smollm2-135m-instruct,gemma3-270m")
    ap.add_argument("--work", default="/tmp/xlaserve_loadbench")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tp", type=int, default=1)
    args = ap.parse_args()
    rows = []
    for alias in args.models.split(","):
        paths = prepare(alias, Path(args.work))
        for fmt, spec in paths.items():
            runs = [measure(spec, args.tp) for _ in range(args.repeats)]
            best = min(runs, key=lambda r: r["seconds"])
            rows.append({"model": alias, "format": fmt, "tp": args.tp,
                         "disk_mib": round(size_mib(spec), 1),
                         "load_s": round(best["seconds"], 2),
                         "all_load_s": [round(r["seconds"], 2) for r in runs],
                         "peak_rss_mib": round(max(r["peak_rss_mib"] for r in runs), 1)})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| model | format | tp | on disk (MiB) | load (s) | peak RSS over baseline (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['format']} | {r['tp']} | {r['disk_mib']} | {r['load_s']} | "
              f"{r['peak_rss_mib']} |")


if __name__ == "__main__":
    main()
