"""GGUF header read time: our walk (``models.gguf.read_header``) vs ``gguf.GGUFReader``.

    python -m bench.gguf_header                      # SmolLM2 (49k vocab), Gemma 3 270M (262k)
    python -m bench.gguf_header --repeats 5 --models smollm2-135m-instruct

Both read the same file's metadata and tensor directory: ``read_header`` to Python values, the
reader to its numpy field views, once bare and once with every field's ``contents()`` (the Python
values, what the loader needs). Each is timed ``--repeats`` times in this process (page cache
warm after the first read); the table shows the best and the median.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any


def _times(fn: Callable[[], Any], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="smollm2-135m-instruct,gemma3-270m")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from gguf import GGUFReader

    from models.assets import fetch
    from models.gguf import read_header

    print("| model | vocabulary | reader | best (s) | median (s) |")
    print("|---|---|---|---|---|")
    for alias in args.models.split(","):
        path = fetch(alias)
        vocab = len(read_header(path).metadata["tokenizer.ggml.tokens"])
        readers: dict[str, Callable[[], Any]] = {
            "models.gguf.read_header": lambda p=path: read_header(p),
            "gguf.GGUFReader": lambda p=path: GGUFReader(p),
            "gguf.GGUFReader + contents()": lambda p=path: {
                k: f.contents() for k, f in GGUFReader(p).fields.items()},
        }
        for name, fn in readers.items():
            ts = _times(fn, args.repeats)
            print(f"| {alias} | {vocab} | {name} | {min(ts):.3f} | {statistics.median(ts):.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
