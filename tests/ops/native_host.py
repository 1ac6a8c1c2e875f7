"""Whether this host must have the native CPU kernels, for the tests that run them."""

from __future__ import annotations

import os
import platform
import shutil

from ops import native


def native_expected() -> bool:
    """x86-64 Linux with AVX2 (+FMA, F16C) and a C++ compiler, not turned off by
    ``XLASERVE_CPU_ISA=none``: every CI and developer machine of this project. There a missing
    kernel is a failed build, which the native tests must report, not skip."""
    return (platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")
            and bool(native.runnable_isas())
            and shutil.which(os.environ.get("CXX", "g++")) is not None
            and os.environ.get("XLASERVE_CPU_ISA", "").strip().lower() != "none")


def native_available() -> bool:
    """The kernels loaded; fails (never skips) where ``native_expected`` says they must."""
    ok = native.kernels() is not None
    assert ok or not native_expected(), \
        "this host can build the native CPU kernels, but they did not load (see the log)"
    return ok
