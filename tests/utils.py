"""Small helpers shared by tests."""

from __future__ import annotations

from models.inputs import HostStepInputs, PackedChunk, pack_step_inputs


def single_seq_inputs(tokens: list[int], start: int, pages: list[int], ps: int,
                      width: int) -> HostStepInputs:
    """StepInputs for one sequence computing ``tokens`` at positions start.. (no padding)."""
    return pack_step_inputs([PackedChunk(tokens, start, pages)], len(tokens), 1, width, ps)
