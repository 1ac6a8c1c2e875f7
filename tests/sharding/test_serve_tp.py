"""``serve DIR --tensor-parallel-size 4`` on 8 simulated CPU devices, over HTTP with the official
client: the answer equals the single-device engine's."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.api.server_utils import ServerProcess, free_port, repo_env, serve_command
from tests.sharding import scenarios
from tests.sharding.conftest import NUM_DEVICES, MeshWorker


def test_serve_tp4_answers_a_chat_request(mesh_worker: MeshWorker, tmp_path: Path) -> None:
    ckpt, want = mesh_worker.call(scenarios.tiny_checkpoint_and_chat_answer,
                                  str(tmp_path / "ckpt"))
    argv = [*serve_command(), ckpt, "--tensor-parallel-size", "4", "--max-model-len", "256",
            "--max-num-seqs", "4", "--max-num-batched-tokens", "16", "--no-compilation-cache"]
    env = repo_env(XLA_FLAGS=f"--xla_force_host_platform_device_count={NUM_DEVICES}")
    server = ServerProcess(argv, tmp_path / "serve.log", env=env).start(600)
    try:
        client = openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0,
                               timeout=300)
        model = client.models.list().data[0].id
        bias = {str(t): v for t, v in scenarios.LETTERS_ONLY.items()}
        r = client.chat.completions.create(model=model, messages=scenarios.CHAT,  # type: ignore
                                           max_tokens=8, temperature=0, logit_bias=bias)
        assert r.choices[0].message.content == want
        assert r.usage is not None and r.usage.completion_tokens > 0
        log = server.log()
        assert "mesh(data=1, model=4)" in log and "kv heads replicated 2x" in log, log[-3000:]
    finally:
        assert server.stop() == 0


@pytest.mark.slow
def test_serve_two_processes_tp8_answers_like_one_device(mesh_worker: MeshWorker,
                                                          tmp_path: Path) -> None:
    """``serve DIR --tensor-parallel-size 8`` as 2 processes x 4 devices: process 0 serves HTTP,
    process 1 restores its half of the checkpoint and follows in lockstep."""
    ckpt, want = mesh_worker.call(scenarios.tiny_checkpoint_and_chat_answer,
                                  str(tmp_path / "ckpt"))
    coord = f"localhost:{free_port()}"
    env = repo_env(XLA_FLAGS="--xla_force_host_platform_device_count=4")
    common = [*serve_command(), ckpt, "--tensor-parallel-size", "8", "--max-model-len", "256",
              "--max-num-seqs", "4", "--max-num-batched-tokens", "16", "--no-compilation-cache",
              "--distributed-coordinator", coord, "--num-processes", "2"]
    follower = ServerProcess([*common, "--process-id", "1"], tmp_path / "p1.log", env=env)
    follower.launch()
    leader = ServerProcess([*common, "--process-id", "0"], tmp_path / "p0.log", env=env)
    try:
        leader.start(600)
        client = openai.OpenAI(base_url=leader.url("/v1"), api_key="unused", max_retries=0,
                               timeout=300)
        bias = {str(t): v for t, v in scenarios.LETTERS_ONLY.items()}
        r = client.chat.completions.create(model=client.models.list().data[0].id,
                                           messages=scenarios.CHAT,  # type: ignore[arg-type]
                                           max_tokens=8, temperature=0, logit_bias=bias)
        assert r.choices[0].message.content == want
    finally:
        assert leader.stop() == 0, leader.log(5000)
        assert follower.proc is not None
        assert follower.proc.wait(120) == 0, follower.log(5000)
        follower.stop()
