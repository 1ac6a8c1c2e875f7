"""How far the machine lets the CPU targets go: f32 GEMM speed of XLA:CPU vs torch (MKL/oneDNN).

    .venv/bin/python -m bench.roofline [--threads 2] [--peer-decode 218.8] [--peer-embed 214.3]

A benchmark, not a test: it prints tables and asserts nothing. Take numbers on an idle machine.

Both issues' speed targets are ratios against a torch peer (transformers ``generate`` for the
engine, the sentence-transformers recipe for pooling). The work of both steps is almost all f32
matrix products, so the question "is 1.5x reachable" is first a question of how fast each
library multiplies the step's own matrices. For each shape the best of several timed loops is
reported, for XLA (``jax.jit(a @ b)``, the path our model takes on CPU) and for torch (run from
``.venv-ref`` in a subprocess, ``torch.set_num_threads(--threads)``). The sweep over all shapes
runs ``--rounds`` times and each shape keeps its best: on a shared machine noise only ever adds
time (one round here measured XLA's M=32 dots at half the speed of the next), and a floor
wants the best the library can do:

- a large square GEMM: the machine's practical f32 peak;
- the SmolLM2-135M decode step at 32 sequences (M = 32): the layer projections x 30 and the LM
  head, summed into a "matmul floor" per step, i.e. the step time if attention, norms, sampling
  and the host cost nothing;
- the all-MiniLM-L6-v2 step for 256 inputs padded to 32 tokens (M = 8192), x 6 layers.

From the floors it prints the best tok/s (embeddings/s) each library's matmuls allow, and the
effective GFLOP/s a 1.5x target would need given the peer's measured figure (``--peer-decode``,
``--peer-embed``: tok/s and embeddings/s from the side-by-side runs in docs/BENCHMARKS.md).
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

# (label, M, K, N, times per step)
PEAK = [("square 2048", 2048, 2048, 2048, 1)]
DECODE = [  # SmolLM2-135M: D 576, 9 q heads + 3 kv heads of 64, MLP 1536, vocab 49152, 30 layers
    ("qkv 576->960", 32, 576, 960, 30),
    ("o 576->576", 32, 576, 576, 30),
    ("gate_up 576->3072", 32, 576, 3072, 30),
    ("down 1536->576", 32, 1536, 576, 30),
    ("lm head 576->49152", 32, 576, 49152, 1),
]
EMBED = [  # all-MiniLM-L6-v2: D 384, MLP 1536, 6 layers; 256 inputs x 32 tokens
    ("qkv 384->1152", 8192, 384, 1152, 6),
    ("o 384->384", 8192, 384, 384, 6),
    ("up 384->1536", 8192, 384, 1536, 6),
    ("down 1536->384", 8192, 1536, 384, 6),
]
SHAPES = PEAK + DECODE + EMBED


def _best(fn: Any, flops: float) -> float:
    """Seconds per call: best of 5 loops, each ~0.2 s of work (at least 3 calls)."""
    fn()
    fn()
    reps = max(3, int(4e10 / flops))
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps)
    return best


def best_of_rounds(sweep: Any, rounds: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for _ in range(rounds):
        for label, t in sweep().items():
            out[label] = min(t, out.get(label, float("inf")))
    return out


def time_xla() -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    mm = jax.jit(lambda a, b: a @ b)
    out = {}
    for label, m, k, n, _ in SHAPES:
        a = jnp.asarray(rng.standard_normal((m, k), np.float32))
        b = jnp.asarray(rng.standard_normal((k, n), np.float32))
        out[label] = _best(lambda a=a, b=b: mm(a, b).block_until_ready(), 2.0 * m * k * n)
    return out


def time_torch(threads: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(threads)
    out = {}
    with torch.inference_mode():
        for label, m, k, n, _ in SHAPES:
            a, b = torch.randn(m, k), torch.randn(k, n)
            out[label] = _best(lambda a=a, b=b: a @ b, 2.0 * m * k * n)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--ref-python", default=str(REPO / ".venv-ref" / "bin" / "python"))
    ap.add_argument("--peer-decode", type=float, default=218.8,
                    help="transformers generate tok/s at batch 32, same machine")
    ap.add_argument("--peer-embed", type=float, default=214.3,
                    help="torch embeddings/s at batch 256, same machine")
    ap.add_argument("--rounds", type=int, default=3, help="sweeps; each shape keeps its best")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(best_of_rounds(lambda: time_torch(args.threads), args.rounds)))
        return
    xla = best_of_rounds(time_xla, args.rounds)
    torch_t: dict[str, float] | None = None
    if Path(args.ref_python).exists():
        res = subprocess.run([args.ref_python, "-m", "bench.roofline", "--child", "--threads",
                              str(args.threads), "--rounds", str(args.rounds)], cwd=REPO,
                             capture_output=True, text=True, check=True)
        torch_t = json.loads(res.stdout.strip().splitlines()[-1])
    else:
        print(f"torch side skipped: {args.ref_python} missing", file=sys.stderr)

    def gf(label: str, t: float) -> str:
        m, k, n = next((m, k, n) for lb, m, k, n, _ in SHAPES if lb == label)
        return f"{2.0 * m * k * n / t / 1e9:.0f}"

    print(f"\nf32 GEMM, {args.threads} threads (GFLOP/s; best of {args.rounds} rounds x 5 loops)\n")
    print("| shape (M x K -> N) | M | XLA:CPU | torch |")
    print("|---|---|---|---|")
    for label, m, _, _, _ in SHAPES:
        tt = gf(label, torch_t[label]) if torch_t else "-"
        print(f"| {label} | {m} | {gf(label, xla[label])} | {tt} |")

    for title, shapes, per, peer, unit in (
            ("SmolLM2 decode step, 32 sequences", DECODE, 32, args.peer_decode, "tok/s"),
            ("MiniLM step, 256 inputs x 32 tokens", EMBED, 256, args.peer_embed, "emb/s")):
        flops = sum(2.0 * m * k * n * times for _, m, k, n, times in shapes)
        need_s = per / (1.5 * peer)
        print(f"\n{title}: {flops / 1e9:.2f} GFLOP of matmuls per step")
        print(f"- 1.5x the peer ({peer} {unit}) needs the whole step in {need_s * 1e3:.1f} ms: "
              f"{flops / need_s / 1e9:.0f} GFLOP/s end to end, counting the matmuls alone")
        for name, times in (("XLA:CPU", xla), ("torch", torch_t)):
            if times is None:
                continue
            floor = sum(times[label] * n_ for label, _, _, _, n_ in shapes)
            print(f"- {name}: matmul floor {floor * 1e3:.1f} ms/step "
                  f"({flops / floor / 1e9:.0f} GFLOP/s) -> at most {per / floor:.0f} {unit} "
                  f"with everything else free")


if __name__ == "__main__":
    main()
