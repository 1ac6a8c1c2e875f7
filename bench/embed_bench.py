"""Embedding throughput: xlaserve's engine vs transformers + torch on all-MiniLM-L6-v2.

A benchmark, not a test: it prints numbers and asserts nothing. Run from the repository root:

    PYTHONPATH=$PWD /work/main/.venv/bin/python bench/embed_bench.py \\
        [--ref-python /work/main/.venv-ref/bin/python] [--seconds 5] [--threads N]

``--model smollm2`` measures decoder embeddings instead (SmolLM2-135M-Instruct, f32, last-token
pooling + normalize, ``serve --task embed``'s engine) against transformers' ``LlamaModel`` from the
same GGUF, right-padded, last real token, ``F.normalize``.

What is measured, for batches of 1, 32 and 256 inputs of ~30 tokens (26..32 with [CLS]/[SEP]):
- ours: ``await AsyncEngineClient.encode(batch)`` end to end through the engine thread:
  scheduling, the packed compiled step (BERT + the pooling executable), host-side L2
  normalisation;
- torch: the sentence-transformers recipe for this model, done by hand (sentence-transformers
  itself is not installed): ``AutoModel`` forward on the batch padded to its longest input,
  attention-masked mean pooling, ``F.normalize``, under ``torch.inference_mode()``, with
  ``torch.set_num_threads(N)``. It runs in the reference venv as a subprocess of this script.
Both sides get the same pre-tokenized inputs (tokenization is excluded from both) and run as
subprocesses at the same thread counts: 1 (both pinned to core 0 with ``taskset``; XLA also
with ``--xla_cpu_multi_thread_eigen=false``, torch ``set_num_threads(1)``) and N (``--threads``,
default the machine's cores: XLA's default pool, torch ``set_num_threads(N)``). On a shared,
oversubscribed machine the 1-thread numbers are the fair ones: multi-threaded runtimes stall
at every op's barrier when a thread is descheduled. Wall-clock embeddings/s and CPU ms per
embedding (steadier under load) are both printed. Each configuration runs for at least
``--seconds`` after a warm-up call; the sides alternate, and ours at 1 thread runs once more at
the end to show how much the load moved. The 1-minute load average is printed before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

BATCHES = (1, 32, 256)
_WORD_TEXT = (
    "the model server batches requests into fixed shapes so that compiled steps run fast on "
    "accelerators while users send embeddings for search retrieval ranking and clustering of "
    "documents about science history travel cooking music sports weather finance health "
    "language learning with small encoders like minilm that map sentences to vectors"
)
WORDS = _WORD_TEXT.split(" ")


def make_texts(tokenizer: Any, n: int, seed: int = 0) -> list[list[int]]:
    """n distinct inputs of 26..32 tokens (with specials), from a fixed word list."""
    rng = random.Random(seed)
    out: list[list[int]] = []
    while len(out) < n:
        words = [rng.choice(WORDS) for _ in range(rng.randint(20, 30))]
        ids = tokenizer(" ".join(words))["input_ids"]
        if 26 <= len(ids) <= 32:
            out.append(ids)
    return out


def timed(run: Any, seconds: float) -> tuple[float, float, int]:
    """Call ``run()`` once to warm up, then repeatedly for >= ``seconds``.

    Returns (wall seconds, CPU seconds of this process, calls). CPU time is the steadier
    measure on a shared machine: it does not count time spent waiting for a core.
    """
    run()
    calls = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    while True:
        run()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and calls >= 3:
            return elapsed, time.process_time() - cpu_start, calls


def rates(b: int, elapsed: float, cpu: float, calls: int) -> dict[str, float]:
    return {"per_s": b * calls / elapsed, "cpu_ms": 1000.0 * cpu / (b * calls)}


# ----------------------------------------------------------------------------- torch worker


def torch_worker(payload_path: str, threads: int, seconds: float) -> None:
    import torch
    from transformers import AutoModel

    payload = json.loads(Path(payload_path).read_text())
    torch.set_num_threads(threads)
    decoder = payload.get("gguf_file") is not None
    if decoder:
        model = AutoModel.from_pretrained(payload["model_dir"], gguf_file=payload["gguf_file"],
                                          dtype=torch.float32).eval()
        with torch.no_grad():  # the GGUF loader's tensors run slowly until copied (make_golden)
            for p in model.parameters():
                p.data = p.data.clone()
    else:
        model = AutoModel.from_pretrained(payload["model_dir"]).eval()
    ids_all: list[list[int]] = payload["inputs"]
    results: dict[str, Any] = {"threads": torch.get_num_threads(), "torch": torch.__version__,
                               "attn": model.config._attn_implementation}

    def encode(batch: list[list[int]]) -> Any:
        t = max(len(x) for x in batch)
        ids = torch.zeros((len(batch), t), dtype=torch.long)
        mask = torch.zeros((len(batch), t), dtype=torch.long)
        for i, x in enumerate(batch):
            ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        with torch.inference_mode():
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
            if decoder:  # right padding: each input's last real token
                pooled = hidden[torch.arange(len(batch)), mask.sum(1) - 1]
            else:
                m = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    for b in payload["batches"]:
        batch = ids_all[:b]
        results[str(b)] = rates(b, *timed(lambda batch=batch: encode(batch), seconds))
    results["sample"] = encode(ids_all[:4]).numpy().tolist()
    print(json.dumps(results))


# ----------------------------------------------------------------------------- ours


def ours_worker(payload_path: str, threads: int, seconds: float) -> None:
    """Runs in the project venv, with XLA's CPU threads set by the parent (``XLA_FLAGS``)."""
    from serving.engine.config import EngineArgs
    from serving.engine.engine_client import AsyncEngineClient
    from serving.engine.pooling_params import PoolingInput, PoolingParams

    payload = json.loads(Path(payload_path).read_text())
    model_dir = Path(payload["model_dir"])
    inputs: list[list[int]] = payload["inputs"]
    gguf = payload.get("gguf_file")
    # The one engine as ``serve`` builds it, with the buckets these batches hit: T 32 (one
    # input), 1024 (32 inputs) and 8192 (256 inputs of ~30 tokens, one step of 256 rows).
    args = EngineArgs(model=str(model_dir / gguf) if gguf else str(model_dir),
                      task="embed" if gguf else "auto", dtype="float32", max_model_len=64,
                      max_num_seqs=256, max_num_batched_tokens=8192, token_buckets=(32, 1024),
                      tensor_parallel_size=payload.get("tp", 1))
    client = AsyncEngineClient.from_args(args)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(client.start())
    results: dict[str, Any] = {"threads": threads,
                               "compiles": client.stats().num_executables}

    def embed(batch: list[list[int]]) -> list[Any]:
        outs = loop.run_until_complete(client.encode([PoolingInput(x) for x in batch],
                                                     PoolingParams()))
        return [o.data for o in outs]

    try:
        for b in payload["batches"]:
            batch = inputs[:b]
            results[str(b)] = rates(b, *timed(lambda batch=batch: embed(batch), seconds))
        sample = embed(inputs[:4])
        results["recompiles"] = client.stats().num_recompiles
    finally:
        loop.run_until_complete(client.shutdown(drain_timeout=1))
        loop.close()
    results["sample"] = np.stack(sample).tolist()
    print(json.dumps(results))


def run_worker(python: str, kind: str, payload: Path, threads: int, seconds: float,
               env: dict[str, str]) -> dict[str, Any]:
    cmd = [python, __file__, f"--{kind}-worker", str(payload), "--threads", str(threads),
           "--seconds", str(seconds)]
    if threads == 1 and shutil.which("taskset"):
        # Pinned to one core: XLA's YNNPACK dots keep a second thread whatever the XLA flags
        # say, so only the affinity makes the 1-thread rows a like-for-like comparison.
        cmd = ["taskset", "-c", "0", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def xla_env(threads: int, devices: int = 1) -> dict[str, str]:
    """XLA's CPU client: one thread, or its default thread pool (every core) otherwise; and
    ``devices`` simulated CPU devices for a sharded run."""
    env = dict(os.environ)
    flags = []
    if threads == 1:
        flags.append("--xla_cpu_multi_thread_eigen=false")
    if devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    # Every token must be a --flag: XLA stops reading XLA_FLAGS at the first one that is not
    # (an earlier "intra_op_parallelism_threads=1" here, a TensorFlow option, hid the ones after).
    env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), *flags]).strip()
    return env


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref-python", default="/work/main/.venv-ref/bin/python")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--model", choices=("minilm", "smollm2"), default="minilm",
                    help="minilm: the BERT encoder; smollm2: decoder (last-token) embeddings")
    ap.add_argument("--tensor-parallel-size", type=int, default=1,
                    help="ours sharded over this many simulated CPU devices (a check that it "
                         "serves, not a speed-up: the devices share the same cores)")
    ap.add_argument("--torch-worker", help=argparse.SUPPRESS)
    ap.add_argument("--ours-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_worker:
        torch_worker(args.torch_worker, args.threads, args.seconds)
        return 0
    if args.ours_worker:
        ours_worker(args.ours_worker, args.threads, args.seconds)
        return 0

    from transformers import AutoTokenizer

    from models import assets

    gguf_file = None
    if args.model == "smollm2":
        from models.gguf import load_gguf

        gguf = Path(assets.fetch("smollm2-135m-instruct"))
        model_dir, gguf_file = gguf.parent, gguf.name
        tokenizer = load_gguf(gguf, progress=False).tokenizer
    else:
        model_dir = Path(assets.fetch("all-minilm-l6-v2"))
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    inputs = make_texts(tokenizer, max(BATCHES))
    lens = [len(x) for x in inputs]
    print(f"{args.model}: {len(inputs)} inputs of {min(lens)}..{max(lens)} tokens "
          f"(mean {np.mean(lens):.1f})")
    payload = Path(f"/tmp/embed_bench_{os.getpid()}.json")
    payload.write_text(json.dumps({"model_dir": str(model_dir), "gguf_file": gguf_file,
                                   "inputs": inputs, "batches": list(BATCHES),
                                   "tp": args.tensor_parallel_size}))
    torch_env = {**os.environ, "PYTHONPATH": ""}
    thread_counts = sorted({1, args.threads})
    load_before = os.getloadavg()
    ours: dict[int, dict[str, Any]] = {}
    refs: dict[int, dict[str, Any]] = {}
    try:
        # Alternate the two sides so that load changes hit both; ours at 1 thread runs again at
        # the end, and its two runs disagreeing shows how much the load moved.
        for n in thread_counts:
            ours[n] = run_worker(sys.executable, "ours", payload, n, args.seconds,
                                 xla_env(n, args.tensor_parallel_size))
            refs[n] = run_worker(args.ref_python, "torch", payload, n, args.seconds, torch_env)
        again = run_worker(sys.executable, "ours", payload, 1, args.seconds,
                           xla_env(1, args.tensor_parallel_size))
    finally:
        payload.unlink()
    load_after = os.getloadavg()

    some = refs[thread_counts[-1]]
    cos = np.sum(np.array(ours[1]["sample"]) * np.array(refs[1]["sample"]), axis=1)
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}; "
          f"{os.cpu_count()} cores; torch {some['torch']} ({some['attn']} attention)")
    print(f"agreement with torch on 4 inputs: min cosine {cos.min():.6f}; recompiles while "
          f"serving: {max(o['recompiles'] for o in [*ours.values(), again])}")
    for n in thread_counts:
        print(f"\n{n} thread(s): embeddings/s (wall) and CPU ms per embedding")
        print(f"{'batch':>6} {'ours':>9} {'torch':>9} {'speedup':>8} {'ours ms':>9} "
              f"{'torch ms':>9} {'CPU ratio':>10}")
        for b in BATCHES:
            k = str(b)
            o, r = ours[n][k], refs[n][k]
            print(f"{b:>6} {o['per_s']:>9.1f} {r['per_s']:>9.1f} {o['per_s'] / r['per_s']:>7.2f}x "
                  f"{o['cpu_ms']:>9.2f} {r['cpu_ms']:>9.2f} {r['cpu_ms'] / o['cpu_ms']:>9.2f}x")
    drift = " ".join(f"{b}: {ours[1][str(b)]['per_s']:.1f}->{again[str(b)]['per_s']:.1f}"
                     for b in BATCHES)
    print(f"\nours at 1 thread, first vs last run (embeddings/s): {drift}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
