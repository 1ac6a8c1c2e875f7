"""The device script's one JSON report (``bench/gpu_check.sh``), rewritten after every step so
that a run cut short still leaves what it measured.

    python -m bench.gpu_check_report step REPORT NAME STATUS SECONDS [--rc N] [--detail TEXT]
                                     [--json FILE]
    python -m bench.gpu_check_report finish REPORT     # sets "ok"; exit 1 unless every step passed

Format: ``{"started": ISO time, "dry_run": bool, "env": {...}, "steps": {NAME: {"status":
"pass" | "fail" | "skipped", "seconds": float, "rc": int | null, "detail": str, "results":
<the step's own JSON, if it wrote one>}}, "ok": bool | null}``; ``ok`` stays null until
``finish``, so a report without it was cut short.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

STATUSES = ("pass", "fail", "skipped")


def load(path: Path) -> dict[str, Any]:
    if path.exists():
        report: dict[str, Any] = json.loads(path.read_text())
        return report
    return {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "dry_run": os.environ.get("GPU_CHECK_DRY_RUN") == "1", "env": {}, "steps": {},
            "ok": None}


def save(path: Path, report: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(path)  # atomic: a kill mid-write leaves the previous report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("step")
    st.add_argument("report", type=Path)
    st.add_argument("name")
    st.add_argument("status", choices=STATUSES)
    st.add_argument("seconds", type=float)
    st.add_argument("--rc", type=int, default=None)
    st.add_argument("--detail", default="")
    st.add_argument("--json", type=Path, default=None, help="the step's own results")
    env = sub.add_parser("env")
    env.add_argument("report", type=Path)
    env.add_argument("json", help="a JSON object of environment facts")
    fin = sub.add_parser("finish")
    fin.add_argument("report", type=Path)
    args = ap.parse_args(argv)
    report = load(args.report)
    if args.cmd == "env":
        report["env"].update(json.loads(args.json))
    elif args.cmd == "step":
        entry: dict[str, Any] = {"status": args.status, "seconds": round(args.seconds, 1),
                                 "rc": args.rc, "detail": args.detail}
        if args.json is not None and args.json.exists():
            try:
                entry["results"] = json.loads(args.json.read_text())
            except json.JSONDecodeError as e:  # a step killed mid-write: say so, keep going
                entry["results_error"] = f"{args.json}: {e}"
        report["steps"][args.name] = entry
    else:
        steps = report["steps"]
        report["ok"] = bool(steps) and all(s["status"] == "pass" for s in steps.values())
    save(args.report, report)
    return 0 if args.cmd != "finish" or report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
