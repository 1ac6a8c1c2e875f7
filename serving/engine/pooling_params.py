"""PoolingParams: the per-request contract between the HTTP layer and the pooling engine.

Built by ``serving.api`` from an Embeddings / Pooling / Score / Rerank request (after schema
validation), consumed by the engine (``AsyncEngineClient.encode``): a pooling request is a prompt
with no output tokens that finishes when its prompt is computed. Field meanings follow vLLM's
``PoolingParams``. ``validate()`` raises ``ValueError`` with vLLM's wording where the HTTP layer's
tests expect it; the server turns it into a 400.

Tasks and what one input yields:
- ``embed``: one vector ``f32[D']`` from the model's pooler (``D' = dimensions or D``),
  L2-normalised when ``normalize`` (default: the model's pooler config);
- ``encode``: per-token hidden states ``f32[n, D]`` (the ``/pooling`` endpoint's output); raw
  unless ``normalize=True``;
- ``classify``: class scores ``f32[L]`` from a sequence-classification head, with the
  classification activation unless ``activation=False``;
- ``score``: the same head on a (text_1, text_2) pair with the cross-encoder activation;
  ``f32[L]`` (``L == 1`` for rerankers).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

TASKS = ("embed", "encode", "classify", "score")


class PoolingKind(enum.Enum):
    """What the runner computes for a pooling request's prompt."""

    POOLED = "pooled"  # one vector from the model's pooler (MEAN / CLS / LAST)
    TOKENS = "tokens"  # every token's hidden state
    SCORES = "scores"  # the sequence-classification head's logits


_KIND_OF_TASK = {"embed": PoolingKind.POOLED, "encode": PoolingKind.TOKENS,
                 "classify": PoolingKind.SCORES, "score": PoolingKind.SCORES}


@dataclass(frozen=True)
class PoolingInput:
    """One sequence to pool: token ids and, for BERT pair inputs, their segment ids."""

    token_ids: Sequence[int]
    token_type_ids: Sequence[int] | None = None


@dataclass(frozen=True)
class PoolingOutput:
    data: np.ndarray  # per task: embed f32[D'], encode f32[n, D], classify/score f32[L]
    num_prompt_tokens: int  # tokens actually pooled (after truncation), for usage


@dataclass(frozen=True)
class PoolingModelInfo:
    """What the engine's model can do; ``PoolingParams.validate`` checks requests against it."""

    tasks: tuple[str, ...]  # subset of TASKS
    hidden_size: int
    max_model_len: int
    num_labels: int = 0
    is_matryoshka: bool = False
    matryoshka_dimensions: tuple[int, ...] | None = None  # None with is_matryoshka: any size


@dataclass(frozen=True)
class PoolingParams:
    task: str = "embed"
    normalize: bool | None = None  # embed / encode; None: the model's default (encode: False)
    dimensions: int | None = None  # embed only: Matryoshka truncation before normalisation
    activation: bool | None = None  # classify / score; None: True
    # None: inputs over max_model_len are an error; -1: truncate to max_model_len;
    # k >= 1: keep the last k tokens (vLLM's left truncation).
    truncate_prompt_tokens: int | None = None

    @property
    def kind(self) -> PoolingKind:
        return _KIND_OF_TASK[self.task]

    def validate(self, info: PoolingModelInfo) -> None:
        """Raise ``ValueError`` for a field the task or the model cannot honour."""
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)}, got {self.task!r}")
        if self.task not in info.tasks:
            raise ValueError(f"the model does not support the {self.task!r} task "
                             f"(supported: {', '.join(info.tasks)})")
        if self.normalize is not None and self.task not in ("embed", "encode"):
            raise ValueError(f"normalize is not supported for the {self.task!r} task")
        if self.activation is not None and self.task not in ("classify", "score"):
            raise ValueError(f"activation is not supported for the {self.task!r} task")
        if self.dimensions is not None:
            if self.task != "embed":
                raise ValueError(f"dimensions is not supported for the {self.task!r} task")
            if not info.is_matryoshka:
                raise ValueError("Model does not support matryoshka representation, "
                                 "changing output dimensions will lead to poor results.")
            if self.dimensions < 1:
                raise ValueError("Dimensions must be greater than 0")
            dims = info.matryoshka_dimensions
            if dims is not None and self.dimensions not in dims:
                raise ValueError(f"Model only supports {list(dims)} matryoshka dimensions, "
                                 f"use other output dimensions will lead to poor results.")
            if self.dimensions > info.hidden_size:
                raise ValueError(f"Dimensions must be at most the model's hidden size "
                                 f"{info.hidden_size}, got {self.dimensions}")
        t = self.truncate_prompt_tokens
        if t is not None:
            if t == 0 or t < -1:
                raise ValueError(f"truncate_prompt_tokens must be -1 or at least 1, got {t}")
            if t > info.max_model_len:
                raise ValueError("truncate_prompt_tokens value is greater than max_model_len. "
                                 "Please, select a smaller truncation size.")

    def truncation_len(self, max_model_len: int) -> int | None:
        """How many tokens to keep (None: no truncation)."""
        t = self.truncate_prompt_tokens
        if t is None:
            return None
        return max_model_len if t == -1 else t
