"""Start a server subprocess on a free loopback port and wait until ``/ready`` is 200."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def repo_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.update(extra)
    return env


class ServerProcess:
    """A server started as ``argv`` (``--port`` is appended) with its log in ``log_path``."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.argv = [*argv, "--port", str(self.port)]
        self.log_path = log_path
        self.env = env or repo_env()
        self.proc: subprocess.Popen[bytes] | None = None
        self.base_url = f"http://127.0.0.1:{self.port}"

    def launch(self) -> ServerProcess:
        """Start the process without waiting for it to become healthy."""
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=self.env, cwd=REPO)
        return self

    def start(self, timeout: float = 600.0) -> ServerProcess:
        """Start the process and wait until ``/ready`` is 200 (the engine is loaded)."""
        self.launch()
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}:\n{self.log(20000)}")
            try:
                if httpx.get(self.url("/ready"), timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log(20000)}")

    def url(self, path: str) -> str:
        return self.base_url + path

    def log(self, tail: int | None = None) -> str:
        """The server's output so far (the last ``tail`` characters if given)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-tail:] if tail else text

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.signalled = True
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        """Signal the server (unless a test already did: a second SIGTERM forces an exit) and
        wait for it to exit; returns its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            if not getattr(self, "signalled", False):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def fake_server(tmp: Path, *args: str, name: str = "fake", **env: str) -> ServerProcess:
    """The real HTTP stack around the fake engine (``tests.api.fake_server``)."""
    argv = [sys.executable, "-m", "tests.api.fake_server", *args]
    return ServerProcess(argv, tmp / f"{name}.log", env=repo_env(**env))


def serve_command() -> list[str]:
    """``serve`` as installed for this checkout: the console script's entry point, run with
    this repository first on the path (``python -c`` keeps it independent of which copy of the
    package the venv's ``serve`` script points to)."""
    return [sys.executable, "-c", "import sys; from serving.cli import main; sys.exit(main())"]


def real_server(tmp: Path, *args: str, name: str = "serve", **env: str) -> ServerProcess:
    """The ``serve`` command with the real engine and model (small options keep compiles short);
    ``env``: extra environment variables."""
    return ServerProcess([*serve_command(), *args], tmp / f"{name}.log", env=repo_env(**env))


def metric(base_url: str, name: str, **labels: str) -> float:
    """The value of one sample of ``GET /metrics`` (the first whose labels include ``labels``;
    0 for a labelled counter that has no sample yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base_url + "/metrics", timeout=10).text
    found = False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name != name:
                continue
            found = True
            if all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
        found = found or family.name == name or family.name + "_total" == name
    if found:
        return 0.0
    raise AssertionError(f"{name} missing from /metrics")
