"""Small helpers shared by tests."""

from __future__ import annotations

import numpy as np

from models.inputs import StepInputs


def single_seq_inputs(tokens: list[int], start: int, pages: list[int], ps: int,
                      width: int) -> StepInputs:
    """StepInputs for one sequence computing ``tokens`` at positions start.. (no padding)."""
    n = len(tokens)
    pos = np.arange(start, start + n, dtype=np.int32)
    pt = np.zeros((1, width), np.int32)
    pt[0, :len(pages)] = pages
    slots = np.asarray(pages, np.int32)[pos // ps] * ps + pos % ps
    return StepInputs(np.asarray(tokens, np.int32), pos, slots.astype(np.int32), pt,
                      np.asarray([start + n], np.int32), np.asarray([0, n], np.int32),
                      np.asarray([n - 1], np.int32))
