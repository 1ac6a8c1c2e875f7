"""Run the real HTTP server (``serving.cli`` option parsing, ``create_app``, Sanic single process)
around ``FakeEngineClient``: ``python -m tests.api.fake_server [serve options]``.

For the shaping/validation tests only; the end-to-end tests start the real ``serve`` command.
Extra environment knobs: ``XLASERVE_FAKE_STEP_S`` (seconds per fake step),
``XLASERVE_FAKE_NO_TEMPLATE=1`` (a tokenizer without a chat template),
``XLASERVE_FAKE_DEFAULTS`` (JSON generation defaults), ``XLASERVE_FAKE_LOAD_FAIL=1``,
``XLASERVE_FAKE_LOAD_DELAY_S`` (extra seconds of "model loading"), ``XLASERVE_FAKE_TOKENIZER``
(the GGUF asset whose tokenizer to use; default SmolLM2), ``XLASERVE_FAKE_RECORD`` (a file that
receives one JSON line per engine request: what reached the engine).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from serving.cli import parse_args, serve_app, setup_logging
from tests.api.fake_engine import FakeEngineClient


def main() -> int:
    engine_args, server_args = parse_args(sys.argv[1:])
    setup_logging(server_args.log_level)

    def factory() -> FakeEngineClient:
        time.sleep(float(os.environ.get("XLASERVE_FAKE_LOAD_DELAY_S", "0")))
        if os.environ.get("XLASERVE_FAKE_LOAD_FAIL"):
            raise RuntimeError("simulated load failure")
        template = None if os.environ.get("XLASERVE_FAKE_NO_TEMPLATE") else "model"
        defaults = json.loads(os.environ.get("XLASERVE_FAKE_DEFAULTS", "{}"))
        record = os.environ.get("XLASERVE_FAKE_RECORD")
        return FakeEngineClient(max_model_len=engine_args.max_model_len or 2048,
                                chat_template=template, generation_defaults=defaults,
                                tokenizer=os.environ.get("XLASERVE_FAKE_TOKENIZER",
                                                         "smollm2-135m-instruct"),
                                record=Path(record) if record else None)

    return serve_app(server_args, factory, model_root=engine_args.model or "fake-smollm2")


if __name__ == "__main__":
    sys.exit(main())
