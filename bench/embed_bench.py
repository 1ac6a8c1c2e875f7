"""Embedding throughput: xlaserve's pooling engine vs transformers + torch on all-MiniLM-L6-v2.

A benchmark, not a test: it prints numbers and asserts nothing. Run from the repository root:

    PYTHONPATH=$PWD /work/main/.venv/bin/python bench/embed_bench.py \\
        [--ref-python /work/main/.venv-ref/bin/python] [--seconds 5] [--threads N]

What is measured, for batches of 1, 32 and 256 inputs of ~30 tokens (26..32 with [CLS]/[SEP]):
- ours: ``await PoolingEngine.embed(batch)`` end to end through the engine thread: bucketing,
  the compiled step (BERT + mean pooling), host-side L2 normalisation;
- torch: the sentence-transformers recipe for this model, done by hand (sentence-transformers
  itself is not installed): ``AutoModel`` forward on the batch padded to its longest input,
  attention-masked mean pooling, ``F.normalize``, under ``torch.inference_mode()``, with
  ``torch.set_num_threads(N)``. It runs in the reference venv as a subprocess of this script.
Both sides get the same pre-tokenized inputs (tokenization is excluded from both) and the same
thread count (XLA's CPU client uses every core it sees; N defaults to the machine's cores).
Each configuration runs for at least ``--seconds`` after a warm-up call, ours then torch, and
then ours again so that load drift on a shared machine shows up as a disagreement between the
two runs of ours. The 1-minute load average is printed before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
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
            m = mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, dim=-1)

    for b in payload["batches"]:
        batch = ids_all[:b]
        results[str(b)] = rates(b, *timed(lambda batch=batch: encode(batch), seconds))
    results["sample"] = encode(ids_all[:4]).numpy().tolist()
    print(json.dumps(results))


# ----------------------------------------------------------------------------- ours


def run_ours(engine: Any, inputs: list[list[int]], seconds: float) -> dict[str, dict[str, float]]:
    from serving.engine.pooling_params import PoolingParams

    loop = asyncio.new_event_loop()
    out: dict[str, dict[str, float]] = {}
    try:
        for b in BATCHES:
            batch = inputs[:b]
            out[str(b)] = rates(b, *timed(
                lambda batch=batch: loop.run_until_complete(engine.embed(batch, PoolingParams())),
                seconds))
    finally:
        loop.close()
    return out


def run_torch(ref_python: str, payload: Path, threads: int, seconds: float) -> dict[str, Any]:
    proc = subprocess.run(
        [ref_python, __file__, "--torch-worker", str(payload), "--threads", str(threads),
         "--seconds", str(seconds)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    if proc.returncode != 0:
        raise RuntimeError(f"torch worker failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref-python", default="/work/main/.venv-ref/bin/python")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--torch-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_worker:
        torch_worker(args.torch_worker, args.threads, args.seconds)
        return 0

    from models import assets
    from serving.engine.engine import enable_compilation_cache
    from serving.engine.pooling_engine import PoolingEngine, load_tokenizer
    from serving.engine.pooling_runner import PoolingRunner

    enable_compilation_cache(None)
    model_dir = Path(assets.fetch("all-minilm-l6-v2"))
    tokenizer = load_tokenizer(model_dir)
    inputs = make_texts(tokenizer, max(BATCHES))
    lens = [len(x) for x in inputs]
    print(f"inputs: {len(inputs)} of {min(lens)}..{max(lens)} tokens (mean {np.mean(lens):.1f})")
    load_before = os.getloadavg()

    from models.bert import load_bert, read_config
    from models.pooling import resolve_pooler_config

    # Buckets that cover these inputs (T 32) and batch sizes up to 256; serving would use
    # the default ladder, which adds shapes but does not change the one these steps hit.
    pooler = resolve_pooler_config(model_dir)
    runner = PoolingRunner(load_bert(model_dir), pooler.pooling_type, max_model_len=256,
                           max_num_seqs=256, token_buckets=[32, 256],
                           max_num_batched_tokens=8192)
    engine = PoolingEngine(runner, read_config(model_dir), pooler, tokenizer,
                           model_name="all-minilm-l6-v2")
    t0 = time.perf_counter()
    engine.start_thread()
    print(f"ours: warmup compiled {runner.num_compiles} executables in "
          f"{time.perf_counter() - t0:.1f}s")

    ours_a = run_ours(engine, inputs, args.seconds)
    payload = Path(f"/tmp/embed_bench_{os.getpid()}.json")
    payload.write_text(json.dumps({"model_dir": str(model_dir), "inputs": inputs,
                                   "batches": list(BATCHES)}))
    # torch at 1 thread and at N threads: on a loaded machine a multi-threaded torch can
    # stall at every op's barrier, so the faster of the two is the baseline (conservative).
    thread_counts = sorted({1, args.threads})
    try:
        refs = {n: run_torch(args.ref_python, payload, n, args.seconds) for n in thread_counts}
    finally:
        payload.unlink()
    ours_b = run_ours(engine, inputs, args.seconds)
    load_after = os.getloadavg()

    from serving.engine.pooling_params import PoolingParams

    ours_sample = np.stack(asyncio.run(engine.embed(inputs[:4], PoolingParams())))
    cos = np.sum(ours_sample * np.array(refs[thread_counts[-1]]["sample"]), axis=1)
    engine.close()

    some = refs[thread_counts[-1]]
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}; "
          f"{os.cpu_count()} cores; torch {some['torch']} ({some['attn']} attention), "
          f"threads {thread_counts}")
    print(f"agreement with torch on 4 inputs: min cosine {cos.min():.6f}; "
          f"recompiles while serving: {engine.stats().num_recompiles}")
    head = "".join(f" {'torch/' + str(n) + 't':>10}" for n in thread_counts)
    print(f"embeddings/s (wall)\n{'batch':>6} {'ours #1':>9} {'ours #2':>9}{head} {'speedup':>8}")
    for b in BATCHES:
        k = str(b)
        ours = (ours_a[k]["per_s"] + ours_b[k]["per_s"]) / 2
        best = max(refs[n][k]["per_s"] for n in thread_counts)
        cols = "".join(f" {refs[n][k]['per_s']:>10.1f}" for n in thread_counts)
        print(f"{b:>6} {ours_a[k]['per_s']:>9.1f} {ours_b[k]['per_s']:>9.1f}{cols} "
              f"{ours / best:>7.2f}x")
    print(f"CPU ms per embedding (lower is better)\n{'batch':>6} {'ours #1':>9} {'ours #2':>9}"
          f"{head} {'ratio':>8}")
    for b in BATCHES:
        k = str(b)
        ours = (ours_a[k]["cpu_ms"] + ours_b[k]["cpu_ms"]) / 2
        best = min(refs[n][k]["cpu_ms"] for n in thread_counts)
        cols = "".join(f" {refs[n][k]['cpu_ms']:>10.2f}" for n in thread_counts)
        print(f"{b:>6} {ours_a[k]['cpu_ms']:>9.2f} {ours_b[k]['cpu_ms']:>9.2f}{cols} "
              f"{best / ours:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
