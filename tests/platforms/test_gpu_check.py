"""``bench/gpu_check.sh --dry-run``: the device script runs every step on CPU (tiny shapes), writes
its JSON report and exits 0; a failing step makes it exit non-zero with every measured step
still in the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def _dry_run(out: Path, **env: str) -> tuple[int, dict[str, Any], str]:
    full = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=REPO, env=full,
                          capture_output=True, text=True, timeout=600)
    report = json.loads((out / "gpu_check.json").read_text())
    return proc.returncode, report, proc.stdout + proc.stderr


def test_dry_run_writes_the_report(tmp_path: Path) -> None:
    rc, report, log = _dry_run(tmp_path)
    assert rc == 0, log[-3000:]
    assert report["dry_run"] is True and report["ok"] is True
    assert report["env"]["backend"] == "cpu" and report["env"]["jax"]
    steps = report["steps"]
    assert list(steps) == ["env", "gpu_tests", "kernel_bench", "throughput"]
    assert all(s["status"] == "pass" for s in steps.values()), steps
    assert "collected" in steps["gpu_tests"]["detail"]
    bench = steps["kernel_bench"]["results"]
    assert bench["rows"] and all("frac_copy_bw" in r for r in bench["rows"])
    rows = steps["throughput"]["results"]
    levels = [r for r in rows if "concurrency" in r]
    assert [r["concurrency"] for r in levels] == [1, 2]
    assert all(r["tok_per_s"] > 0 and r["ttft_mean_ms"] > 0 and r["decode_step_ms"] > 0
               for r in levels)
    compile_row = rows[-1]
    assert compile_row["compile_cold_s"] > 0 and compile_row["compile_warm_s"] > 0
    assert set(compile_row["buckets"]) == {"1", "2", "4", "8", "16"}
    for name in ("gpu_tests", "kernel_bench", "throughput"):
        assert (tmp_path / f"{name}.log").exists()


def test_a_failing_step_fails_the_run_and_keeps_the_others(tmp_path: Path) -> None:
    rc, report, log = _dry_run(tmp_path, GPU_CHECK_STEPS="gpu_tests,kernel_bench",
                               KERNEL_BENCH_ARGS="--no-such-flag")
    assert rc != 0, log[-3000:]
    steps = report["steps"]
    assert report["ok"] is False
    assert steps["gpu_tests"]["status"] == "pass"
    assert steps["kernel_bench"]["status"] == "fail" and steps["kernel_bench"]["rc"] == 2
    assert "throughput" not in steps
