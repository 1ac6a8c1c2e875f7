"""One process of the multi-host test: ``python -m tests.sharding.multihost_main PORT N I OUT``.

Each process sees 4 simulated CPU devices; together the N processes form one tp = 4 * N mesh over
gloo collectives. Every process builds the same seeded tiny model. Process 0 is the lockstep
leader: it runs greedy and penalised generation through its engine and writes the tokens as
JSON to OUT. The others go through ``maybe_run_follower`` exactly as ``serve`` would run them.
"""

from __future__ import annotations

import json
import os
import sys

LOCAL_DEVICES = 4


def main() -> None:
    port, n, pid, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    from serving.engine.config import EngineArgs
    from serving.engine.engine import LLMEngine, maybe_run_follower
    from tests.sharding import scenarios

    args = EngineArgs(**scenarios.ENGINE_KW, tensor_parallel_size=LOCAL_DEVICES * n,
                      distributed_coordinator=f"localhost:{port}", num_processes=n,
                      process_id=pid)
    if maybe_run_follower(args, load=scenarios.tiny):
        return
    engine = LLMEngine(args, loaded=scenarios.tiny())
    tokens = scenarios.multihost_answer(engine)
    assert engine.sharder is not None and engine.sharder.lockstep is not None
    engine.sharder.lockstep.stop()
    with open(out, "w") as f:
        json.dump(tokens, f)


if __name__ == "__main__":
    main()
