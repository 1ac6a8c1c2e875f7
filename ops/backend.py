"""Single switch point: which attention implementation the model uses (reference for now)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ops import attention

log = logging.getLogger("xlaserve.ops")


def get_attention_fn(backend: str = "auto") -> tuple[Callable[..., Any], Callable[..., Any], str]:
    if backend not in ("auto", "reference"):
        raise ValueError(f"attention backend {backend!r} is not available in this build")
    desc = "pure-jnp reference ragged paged attention"
    log.info("attention backend: %s", desc)
    return attention.ragged_paged_attention_reference, attention.write_kv, desc
