"""Fixtures: SmolLM2's tokenizer (built by the project's GGUF loader, cached) and one grammar
backend over it, as wide as SmolLM2's logits would be if they were padded past the vocabulary
(49155: not a multiple of 32, so the last mask word is partial)."""

from __future__ import annotations

from typing import Any

import pytest

from serving.engine.structured_output import GrammarBackend
from tests.api.fake_engine import load_smollm2_tokenizer

# Wider than the tokenizer's 49152 ids, as a padded logits width is.
LOGITS_WIDTH = 49155


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    return load_smollm2_tokenizer()


@pytest.fixture(scope="session")
def backend(tokenizer: Any) -> GrammarBackend:
    return GrammarBackend.from_hf_tokenizer(tokenizer, [tokenizer.eos_token_id], LOGITS_WIDTH)
