"""xlaserve against peer servers, one after another in one run, with bench/serve_bench.py.

    .venv/bin/python -m bench.compare_servers --concurrency 1,8,32 --max-tokens 128 \
        --peer llama-server-f32 --peer llama-cpp-python-q4_1 --json-out /tmp/compare.json
    .venv/bin/python -m bench.compare_servers --concurrency 32 --sampling greedy,top-p \
        --peer llama-server-f16 --rounds 2

Each server is started alone (they would fight over the 2 cores otherwise), warmed up, measured
at every concurrency level with the same prompts (``--prompt-len`` random words, seed 0,
``ignore_eos`` so every request yields exactly ``--max-tokens``), then stopped. ``--sampling``
names the request settings (``SAMPLING``), run one after the other at each level so that load
changes hit them alike, each on its own prompts (``--seed`` = its index: the same prompts twice
would let the second setting skip its prefill through the servers' prompt caches);
``--rounds`` repeats the whole set of servers. Peers are built
outside the repo by scripts/build_peers.sh (see bench/peers/README.md); their paths come from
``$PEERS_DIR`` (default /work/peers).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
PEERS = Path(os.environ.get("PEERS_DIR", "/work/peers"))
# The same request body to every server. llama-server fills what a request leaves out with its
# own sampler defaults (top_k 40, min_p 0.05, ...), xlaserve with vLLM's (off).
SAMPLING: dict[str, dict[str, float]] = {
    "greedy": {"temperature": 0.0},
    "top-p": {"temperature": 0.8, "top_p": 0.95},
    "top-k+min-p": {"temperature": 0.8, "top_k": 40, "min_p": 0.05},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def q4_1_path() -> str:
    sys.path.insert(0, str(REPO))
    from models.assets import fetch
    return str(fetch("smollm2-135m-instruct"))


def server_cmd(name: str, port: int, args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    """Command and extra request body for each known server."""
    if name in ("xlaserve", "xlaserve-avx2"):
        # xlaserve-avx2: the native kernels' AVX2 build forced (XLASERVE_CPU_ISA, set by main),
        # what an AVX2-only host such as the AMD EPYC runs, on this CPU.
        return ([str(REPO / ".venv/bin/serve"), "--port", str(port), "--max-num-seqs", "32",
                 "--max-model-len", "1024", "--dtype", "float32", "--disable-log-requests"], {})
    if name.startswith("llama-server-"):
        model = {"f32": PEERS / "models/smollm2-f32.gguf", "f16": PEERS / "models/smollm2-f16.gguf",
                 "q4_1": q4_1_path()}[name.rsplit("-", 1)[1]]
        return ([str(PEERS / "build-llama-server/bin/llama-server"), "-m", str(model),
                 "--host", "127.0.0.1", "--port", str(port), "-np", "32", "-c", "16384",
                 "--cont-batching", "-t", "2", "-tb", "2", "--alias", "smollm2", "--no-webui"], {})
    if name.startswith("llama-cpp-python-"):
        model = {"f32": PEERS / "models/smollm2-f32.gguf",
                 "q4_1": q4_1_path()}[name.rsplit("-", 1)[1]]
        return ([str(PEERS / "venv-lcp/bin/python"), "-m", "llama_cpp.server", "--model",
                 str(model), "--host", "127.0.0.1", "--port", str(port), "--n_threads", "2",
                 # Its default (True) cuts a streaming request short whenever a new one
                 # arrives: at c=8 requests returned ~17 of 128 tokens.
                 "--n_ctx", "2048", "--interrupt_requests", "False"],
                {"min_tokens": args.max_tokens})
    raise SystemExit(f"unknown server {name!r}")


def wait_ready(base: str, proc: subprocess.Popen[bytes], timeout: float = 900) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        # xlaserve's /ready (its /health is liveness: 200 while loading); peers without /ready
        # answer it 404 and are ready when /health or /v1/models is 200.
        for path in ("/ready", "/health", "/v1/models"):
            try:
                status = httpx.get(base + path, timeout=2).status_code
            except httpx.HTTPError:
                break
            if status == 200:
                return time.time() - t0
            if path == "/ready" and status != 404:
                break  # xlaserve, still loading
        time.sleep(1)
    raise RuntimeError("server did not become ready")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer", action="append", default=[],
                    help="llama-server-{f32,f16,q4_1}, llama-cpp-python-{f32,q4_1}, or "
                         "xlaserve-avx2 (xlaserve with its AVX2 kernels forced)")
    ap.add_argument("--no-xlaserve", action="store_true")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--num-requests", type=int, default=None)
    ap.add_argument("--sampling", default="greedy", help=f"comma-separated: {', '.join(SAMPLING)}")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    names = ([] if args.no_xlaserve else ["xlaserve"]) + args.peer
    results: dict[str, Any] = {}
    for rnd, name in ((r, n) for r in range(args.rounds) for n in names):
        port = free_port()
        cmd, extra = server_cmd(name, port, args)
        log = open(f"/tmp/compare_{name}.log", "w")  # noqa: SIM115 (lives as long as proc)
        env = {**os.environ, **({"XLASERVE_CPU_ISA": "avx2"} if name == "xlaserve-avx2" else {})}
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True, env=env)
        base = f"http://127.0.0.1:{port}"
        try:
            startup = wait_ready(base, proc)
            print(f"== {name} (ready in {startup:.0f}s), round {rnd + 1}", flush=True)
            levels = []
            for c in [int(x) for x in args.concurrency.split(",")]:
                for i, mode in enumerate(args.sampling.split(",")):
                    out = Path(f"/tmp/compare_{name}_{c}_{mode}.json")
                    # One wave per level (at least 4 requests): a fixed total would make the
                    # concurrency-1 level dominate the run time.
                    n = args.num_requests or max(4, c)
                    bench = [sys.executable, str(REPO / "bench/serve_bench.py"), "--base-url",
                             base, "--concurrency", str(c), "--num-requests", str(n),
                             "--max-tokens", str(args.max_tokens), "--prompt-len",
                             str(args.prompt_len), "--ignore-eos", "--seed", str(i),
                             "--label", f"{name} {mode}", "--json-out", str(out),
                             "--extra-body", json.dumps({**SAMPLING[mode], **extra})]
                    subprocess.run(bench, check=True)
                    levels.append({"sampling": mode, **json.loads(out.read_text())})
            results[f"{name} round {rnd + 1}"] = {"startup_s": startup, "levels": levels}
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            log.close()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))
    print(summary(results))


def summary(results: dict[str, Any]) -> str:
    """A markdown table: per server, sampling and concurrency, the median over rounds of output
    tok/s, TTFT p50 and ITL p50, and xlaserve's (and xlaserve-avx2's) tok/s as a ratio of each
    peer's."""
    cells: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for key, res in results.items():
        name = key.rsplit(" round ", 1)[0]
        for lv in res["levels"]:
            for stat in lv["levels"]:
                cells.setdefault((name, lv["sampling"], stat["concurrency"]), []).append(stat)

    def med(name: str, mode: str, c: int, field: str) -> float:
        vals = sorted(st[field] for st in cells[(name, mode, c)])
        return float(vals[len(vals) // 2]) if len(vals) % 2 else \
            (vals[len(vals) // 2 - 1] + vals[len(vals) // 2]) / 2

    names = list(dict.fromkeys(k[0] for k in cells))
    ours = [n for n in names if n.startswith("xlaserve")]
    peers = [n for n in names if n not in ours]
    head = "| server | sampling | streams | tok/s | TTFT p50 ms | ITL p50 ms |" + "".join(
        f" xlaserve / {p} |" for p in peers)
    lines = [head, "|" + "---|" * (6 + len(peers))]
    for name, mode, c in sorted(cells, key=lambda k: (k[1], k[2], names.index(k[0]))):
        tok_s, ttft, itl = (med(name, mode, c, f) for f in (
            "output_tokens_per_s", "ttft_ms_p50", "itl_ms_p50"))
        row = f"| {name} | {mode} | {c} | {tok_s:.1f} | {ttft:.0f} | {itl:.1f} |"
        for p in peers:
            ok = name in ours and (p, mode, c) in cells
            ratio = med(name, mode, c, "output_tokens_per_s") / \
                med(p, mode, c, "output_tokens_per_s") if ok else None
            row += f" {ratio:.2f}x |" if ratio is not None else " |"
        lines.append(row)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
