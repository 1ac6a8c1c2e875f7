"""Where a BERT encoder step goes: the whole step, the step without attention, and attention
alone, with the projections on the native packed GEMM and on XLA's dots.

A benchmark, not a test: it prints numbers and asserts nothing. Run from the repository root,
pinned to one core for figures that survive a shared machine:

    XLA_FLAGS=--xla_cpu_multi_thread_eigen=false taskset -c 0 \\
        PYTHONPATH=$PWD /work/main/.venv/bin/python bench/embed_profile.py [--batch 256]

all-MiniLM-L6-v2 on ``bench/embed_bench.py``'s inputs (26..32 tokens), packed into one step of
T = 8192 (batch 256) or 1024 (batch <= 32) as the engine's buckets do; the encoder forward alone
(no pooling, no host work) under ``jax.jit``, best of ``--repeats`` calls after a warm-up, wall
and CPU milliseconds (CPU: this process, every thread). "without attention" replaces the
attention by the identity on q, so the difference is attention's share.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from transformers import AutoTokenizer

from bench.embed_bench import make_texts
from models import assets
from models.bert import BertModel, load_bert, pack_encoder_linears
from models.inputs import PackedChunk, pack_step_inputs
from ops import attention, backend


def best_of(run: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """(wall ms, CPU ms), each the best of ``repeats`` calls after one warm-up call."""
    jax.block_until_ready(run())
    wall, cpu = float("inf"), float("inf")
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(run())
        wall = min(wall, time.perf_counter() - t)
        cpu = min(cpu, time.process_time() - c)
    return 1e3 * wall, 1e3 * cpu


def no_attention(q: jax.Array, k: jax.Array, v: jax.Array, cu_q_lens: jax.Array, *,
                 sm_scale: float) -> jax.Array:
    """The identity on q, in attention's place: the step without attention."""
    return q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    model_dir = Path(assets.fetch("all-minilm-l6-v2"))
    ids = make_texts(AutoTokenizer.from_pretrained(str(model_dir)), args.batch)
    tokens = 8192 if args.batch > 32 else 1024
    inp = jax.tree.map(jnp.asarray, pack_step_inputs(
        [PackedChunk(x, 0, ()) for x in ids], tokens, args.batch, 0, 16))
    linear = backend.get_linear_fn("native", "f32")
    rows: dict[str, tuple[float, float]] = {}
    for matmuls in ("XLA dots", "native GEMM"):
        for attn_name, attn_fn in (("", attention.ragged_encoder_attention_reference),
                                   (", without attention", no_attention)):
            model = load_bert(model_dir, jnp.float32)
            assert isinstance(model, BertModel)
            for layer in model.layers:
                layer.attn_fn = attn_fn
            if matmuls == "native GEMM" and linear is not None:
                pack_encoder_linears(model, linear)
            graph, state = nnx.split(model)
            step = jax.jit(lambda s, i, g=graph: nnx.merge(g, s)([], i)[0])
            rows[f"step, {matmuls}{attn_name}"] = best_of(
                functools.partial(step, state, inp), args.repeats)
    cfg = model.cfg
    q = jax.random.normal(jax.random.key(0), (tokens, cfg.num_attention_heads, cfg.head_dim))
    attend = jax.jit(lambda q, cu: attention.ragged_encoder_attention_reference(
        q, q, q, cu, sm_scale=cfg.head_dim ** -0.5))
    wall, cpu = best_of(lambda: attend(q, inp.cu_q_lens), args.repeats)
    rows[f"attention alone x {cfg.num_hidden_layers} layers"] = (
        cfg.num_hidden_layers * wall, cfg.num_hidden_layers * cpu)
    print(f"MiniLM, batch {args.batch}, T = {tokens}; best of {args.repeats}")
    for name, (wall, cpu) in rows.items():
        print(f"{name:>40}: wall {wall:8.1f} ms  CPU {cpu:8.1f} ms")


if __name__ == "__main__":
    main()
