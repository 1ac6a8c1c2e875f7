"""Reasoning parsers with vLLM's names (``--reasoning-parser``): ``deepseek_r1``, ``qwen3``.
Importing the package registers them."""

from serving.api.reasoning import deepseek_r1, qwen3
from serving.api.reasoning.base import (
    ReasoningDelta,
    ReasoningParser,
    Split,
    get_reasoning_parser,
    reasoning_parser_names,
    register_reasoning_parser,
)

__all__ = [
    "ReasoningDelta",
    "ReasoningParser",
    "Split",
    "deepseek_r1",
    "get_reasoning_parser",
    "qwen3",
    "reasoning_parser_names",
    "register_reasoning_parser",
]
