"""Where a decode step's time goes, for SmolLM2 f32 at S concurrent sequences.

    .venv/bin/python -m bench.step_breakdown --seqs 32 --context 160

Measures (median of repeated runs, same process): the engine's whole step (schedule + host
prep + device + update); the compiled model step alone; the same model with attention swapped
for identity (→ attention's share) and the KV write dropped too; the LM head alone; the greedy
argmax and the full sampler. Host overhead = engine step - device parts: a difference of
separately timed runs, so it carries their noise (tens of ms); ``bench/step_profile.py`` reads
every part of one engine step from XLA's per-op trace instead.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.inputs import Inputs, StepInputs
from models.loader import load_model
from ops.attention import ragged_paged_attention_reference, write_kv


def med(fn: Callable[[], Any], n: int) -> float:
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e3


def measure_model(name: str, attn: Any, write: Any, s: int, ctx: int, width: int, ps: int,
                  repeats: int, res: dict[str, float]) -> None:
    ld = load_model(None, dtype="float32", attn_fn=attn, write_fn=write, progress=False)
    cfg = ld.config
    pages = s * width + 1
    shape = (cfg.num_kv_heads, pages, ps, cfg.head_dim)
    box: list[Any] = [[(jnp.zeros(shape), jnp.zeros(shape)) for _ in range(cfg.num_layers)]]
    pt = (1 + np.arange(s * width, dtype=np.int32)).reshape(s, width)
    pos = np.full(s, ctx, np.int32)
    inp = Inputs(token_ids=np.arange(s, dtype=np.int32), positions=pos,
                 slot_mapping=(pt[np.arange(s), pos // ps] * ps + pos % ps).astype(np.int32),
                 page_table=pt, kv_lens=pos + 1, cu_q_lens=np.arange(s + 1, dtype=np.int32),
                 logits_indices=np.arange(s, dtype=np.int32),
                 token_type_ids=np.zeros(s, np.int32))
    g, st = nnx.split(ld.model)

    def f(state: Any, kv: Any, inp: StepInputs) -> Any:
        m: Any = nnx.merge(g, state)
        h, kv = m(kv, inp)
        return kv, h[inp.logits_indices]

    jf = jax.jit(f, donate_argnums=1)

    def run() -> Any:
        box[0], h = jf(st, box[0], inp)
        return h

    res[name] = med(run, repeats)
    if name == "model step":
        h = run()
        head = jax.jit(lambda st, h: nnx.merge(g, st).logits(h))
        res["LM head"] = med(lambda: head(st, h), repeats)
        logits = head(st, h)
        am = jax.jit(lambda lg: jnp.argmax(lg, -1))
        res["argmax (greedy fast path)"] = med(lambda: am(logits), repeats)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--context", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    s, ctx, ps = args.seqs, args.context, 16
    width = -(-(ctx + 1) // ps)
    res: dict[str, float] = {}

    def ident_attn(q: jax.Array, *a: Any, **k: Any) -> jax.Array:
        return q

    def no_write(kc: jax.Array, vc: jax.Array, *a: Any) -> tuple[jax.Array, jax.Array]:
        return kc, vc

    for name, attn, write in [("model step", ragged_paged_attention_reference, write_kv),
                              ("model step, attention = identity", ident_attn, write_kv),
                              ("model step, no attention, no KV write", ident_attn, no_write)]:
        measure_model(name, attn, write, s, ctx, width, ps, args.repeats, res)
    from serving.engine.llm import LLM
    from serving.engine.sampling_params import SamplingParams
    llm = LLM(None, max_model_len=max(1024, ctx + 256), max_num_seqs=s,
              max_num_batched_tokens=max(256, s))
    eng = llm.engine
    for i in range(s):
        eng.add_request(f"b{i}", [1 + (i * 7 + j) % 1000 for j in range(ctx - 8)],
                        SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
    while any(q.num_computed < q.prompt_len for q in eng.scheduler.running) or \
            eng.scheduler.waiting:
        eng.step()
    for _ in range(10):
        eng.step()
    res["engine step (greedy, all decoding)"] = med(eng.step, args.repeats)
    print(f"\nSmolLM2-135M f32, {s} sequences decoding at ~{ctx} context "
          f"(jax {jax.__version__}, {jax.devices()[0].platform})")
    print("| part | ms |\n|---|---|")
    for k, v in res.items():
        print(f"| {k} | {v:.1f} |")
    attn = res["model step"] - res["model step, attention = identity"]
    write = res["model step, attention = identity"] - res["model step, no attention, no KV write"]
    host = res["engine step (greedy, all decoding)"] - res["model step"] - res["LM head"] - \
        res["argmax (greedy fast path)"]
    print(f"| = attention | {attn:.1f} |\n| = KV write | {write:.1f} |\n"
          f"| = matmuls + norms + rope (no attention, no write, no head) | "
          f"{res['model step, no attention, no KV write']:.1f} |\n| = host overhead | {host:.1f} |")


if __name__ == "__main__":
    main()
