"""Engine faults: the test-only fault hook, and how a step's out-of-memory error is recognised.

The fault hook lets the reliability suite (tests/reliability/) make the model step of a real
server fail on purpose. ``$XLASERVE_TEST_FAULT`` names one fault, ``KIND@N``:

- ``raise@N``: engine step N raises (an engine bug: the engine is dead, see docs/RELIABILITY.md);
- ``hang@N``: engine step N never returns (what the ``--engine-step-timeout`` watchdog catches);
- ``oom@N``: engine step N raises a ``RESOURCE_EXHAUSTED`` error, as XLA does when a step's
  buffers do not fit (the requests of that step fail; the engine keeps serving).

Steps count from 1, from the first step after warm-up. The hook exists only when the engine was
built with ``enable_test_hooks``; with the variable set and the flag off the engine refuses to
start, so a stray variable can never break a production server quietly.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from jax.errors import JaxRuntimeError

FAULT_ENV = "XLASERVE_TEST_FAULT"
FAULT_KINDS = ("raise", "hang", "oom")


class InjectedFault(RuntimeError):
    """What ``raise@N`` raises."""


class InjectedOutOfMemory(RuntimeError):
    """What ``oom@N`` raises: the message XLA gives an allocation that does not fit."""


@dataclass(frozen=True)
class FaultSpec:
    kind: str
    step: int

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        """``KIND@N`` → FaultSpec; ``ValueError`` names what is wrong."""
        kind, at, step = text.strip().partition("@")
        if not at or kind not in FAULT_KINDS or not step.isdigit() or int(step) < 1:
            raise ValueError(f"${FAULT_ENV}={text!r}: expected KIND@N with KIND one of "
                             f"{', '.join(FAULT_KINDS)} and N a step number from 1")
        return cls(kind, int(step))


class FaultHook:
    """Called by the engine before each step's execution; fires once, at step ``spec.step``."""

    def __init__(self, spec: FaultSpec) -> None:
        self.spec = spec
        self.steps = 0
        self._never = threading.Event()  # never set: a hang lasts until the process exits

    def before_execute(self) -> None:
        self.steps += 1
        if self.steps != self.spec.step:
            return
        where = f"engine step {self.steps} (test fault hook)"
        if self.spec.kind == "raise":
            raise InjectedFault(f"injected fault at {where}")
        if self.spec.kind == "oom":
            raise InjectedOutOfMemory(f"RESOURCE_EXHAUSTED: Out of memory while trying to "
                                      f"allocate the step's buffers, injected at {where}")
        self._never.wait()


def fault_hook_from_env(enabled: bool) -> FaultHook | None:
    """The hook ``$XLASERVE_TEST_FAULT`` asks for; None when it is unset. Raises ``ValueError``
    when it is set without ``enabled`` (``--enable-test-hooks``) or malformed."""
    text = os.environ.get(FAULT_ENV, "")
    if not text:
        return None
    if not enabled:
        raise ValueError(f"${FAULT_ENV} is set but --enable-test-hooks is not: the fault hook "
                         "is for tests only; unset the variable")
    return FaultHook(FaultSpec.parse(text))


def is_out_of_memory(exc: BaseException) -> bool:
    """An XLA ``RESOURCE_EXHAUSTED`` error (device memory), or the hook's imitation of one."""
    return isinstance(exc, InjectedOutOfMemory | JaxRuntimeError) and \
        "RESOURCE_EXHAUSTED" in str(exc)
