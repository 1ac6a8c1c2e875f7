"""Peer: transformers + PyTorch (CPU) ``generate`` at fixed batch sizes. Run with .venv-ref.

Prints one JSON line per batch size: {"batch", "new_tokens", "seconds", "tok_per_s"}.
Called by bench/offline_throughput.py so both sides run in the same session.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts-json", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(args.gguf)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32).eval()
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    prompts = json.loads(Path(args.prompts_json).read_text())
    for b in [int(x) for x in args.batches.split(",")]:
        batch = tok(prompts[:b], return_tensors="pt", padding=True)
        with torch.inference_mode():
            model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            t0 = time.perf_counter()
            out = model.generate(**batch, max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, do_sample=False)
            dt = time.perf_counter() - t0
        n = (out.shape[1] - batch["input_ids"].shape[1]) * b
        print(json.dumps({"batch": b, "new_tokens": n, "seconds": dt, "tok_per_s": n / dt}))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
