"""Decoder (Llama-family) models as embedding models: one causal prefill per step, then a pooler.

vLLM serves a decoder with ``--task embed`` by running the prompt through the model and pooling
the final-normed hidden states (LAST + normalize by default). Here that runs on the same Flax
models the generation engine uses (``models.llama``, ``models.gemma3``), through their paged
forward and the configured attention backend (``ops.backend``): every sequence of a step is a
complete prompt, so the step is a causal prefill whose keys and values go to a small scratch KV
cache owned by the runner.

Step layout (the ``StepInputs`` contract of ``models.inputs`` / ``ops.attention``): the batch's
sequences are packed back to back on one token axis of P slots; sequence i owns tokens
``cu_q_lens[i]:cu_q_lens[i+1]`` at positions ``0..n_i-1``, its own run of whole pages
(consecutive page ids from 1; page 0 is the null page), and ``kv_lens[i] = n_i``. Padding tokens
(past ``cu_q_lens[S]``) write nothing (slot -1) and attend to nothing; padding sequences have
length 0. A token therefore sees exactly the earlier tokens of its own sequence, which makes a
sequence's result independent of its neighbours (up to float summation order in the matmuls).
The scratch cache is explicit state: passed into the step, returned, donated, never grown; what
an earlier step left in it is never read (a sequence reads only the slots it wrote this step).

Compiled shapes: one executable per output kind and packed-token bucket P (powers of two from 16
up to the largest batch the engine may form, ``S * T`` of ``BucketedRunner.batch_shapes``), with
``min(P, max sequences)`` sequence rows. A batch runs in the smallest P that holds its real
tokens, so short sequences in a long-bucket batch cost no padding. ``warmup`` compiles them all.

Outputs: ``pooled`` f32[S, D] from ``models.pooling.pool_packed`` (MEAN / CLS = first token /
LAST; not normalised: the engine normalises per request) and ``hidden`` f32[P, D], the per-token
final hidden states sliced per sequence on the host (``/pooling``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ModelConfig
from models.inputs import KVCache, StepInputs, pack_step_inputs
from models.loader import load_model
from models.pooling import PoolerConfig, PoolingType, pool_packed, resolve_pooler_config
from models.registry import ModelLoadError
from serving.engine.pooling_runner import (
    HIDDEN_MAX_SEQS,
    MIN_TOKEN_BUCKET,
    BucketedRunner,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecoderPoolingConfig:
    """What ``PoolingEngine`` reads about a decoder embedding model (the fields it reads from
    ``BertConfig`` for encoders); decoders have no segment ids and no classification head."""

    architecture: str
    vocab_size: int
    hidden_size: int
    type_vocab_size: int = 0
    num_labels: int = 0
    problem_type: str | None = None
    cross_encoder_activation: str | None = None
    id2label: tuple[tuple[int, str], ...] = ()
    matryoshka_dimensions: tuple[int, ...] | None = None
    is_matryoshka: bool = False
    is_classifier: bool = False


def packed_buckets(max_tokens: int) -> list[int]:
    """Powers of two from 16 below ``max_tokens``, then ``max_tokens`` itself."""
    out: list[int] = []
    p = MIN_TOKEN_BUCKET
    while p < max_tokens:
        out.append(p)
        p *= 2
    return [*out, max_tokens]


class DecoderPoolingRunner(BucketedRunner):
    """A decoder's weights on device, a scratch KV cache, one executable per (kind, rows, P).

    ``max_num_seqs``, ``max_num_batched_tokens``, ``token_buckets``, ``seq_buckets`` and
    ``hidden_max_seqs`` set the engine's batch grid (``BucketedRunner``); the packed buckets
    follow from it (``packed_token_buckets`` replaces the powers of two below the largest one,
    for tests that want few compilations). ``page_size`` is the scratch cache's page size,
    ``kv_dtype`` its dtype (default: the weights').
    """

    def __init__(
        self,
        model: nnx.Module,
        model_cfg: ModelConfig,
        pooling_type: PoolingType,
        *,
        max_model_len: int,
        max_num_seqs: int = 32,
        max_num_batched_tokens: int | None = None,
        token_buckets: Sequence[int] | None = None,
        seq_buckets: Sequence[int] | None = None,
        hidden_max_seqs: int = HIDDEN_MAX_SEQS,
        page_size: int = 16,
        kv_dtype: Any = None,
        packed_token_buckets: Sequence[int] | None = None,
    ):
        if pooling_type == PoolingType.ALL:
            raise ValueError("the model's pooler must reduce to one vector (MEAN/CLS/LAST); "
                             "per-token output is the 'hidden' kind")
        if max_model_len < 1:
            raise ValueError("max_model_len must be at least 1")
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        super().__init__(max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                         max_num_batched_tokens=max_num_batched_tokens,
                         token_buckets=token_buckets, seq_buckets=seq_buckets,
                         hidden_max_seqs=hidden_max_seqs)
        self.kinds = ("pooled", "hidden")
        self.model_cfg = model_cfg
        self.pooling_type = pooling_type
        self.vocab_size = model_cfg.vocab_size
        self.type_vocab_size = 1
        self.hidden_size = model_cfg.hidden_size
        self.page_size = page_size
        # Packed-token buckets and sequence rows per kind, from the batches the engine forms.
        self.packed: dict[str, list[int]] = {}
        self._max_rows: dict[str, int] = {}
        for kind in self.kinds:
            grid = self.batch_shapes(kind)
            need = max(s * t for s, t in grid)
            self._max_rows[kind] = max(s for s, _ in grid)
            if packed_token_buckets:
                mine = sorted({p for p in packed_token_buckets if p < need} | {need})
            else:
                mine = packed_buckets(need)
            self.packed[kind] = mine
        # Whole pages per sequence: at most ceil(P / B) + rows pages in a step, plus page 0.
        self.num_pages = 1 + max(-(-p // page_size) + self.rows(p, kind)
                                 for kind in self.kinds for p in self.packed[kind])
        self.graphdef, state = nnx.split(model)
        self._state_template = state
        # Plain nested dicts: jit flattens these in C++ (nnx Variables flatten in Python).
        self._state = nnx.to_pure_dict(state)
        kv_dtype = kv_dtype or jax.tree_util.tree_leaves(self._state)[0].dtype
        shape = (model_cfg.num_kv_heads, self.num_pages, page_size, model_cfg.head_dim)
        self._kv: KVCache = [(jnp.zeros(shape, kv_dtype), jnp.zeros(shape, kv_dtype))
                             for _ in range(model_cfg.num_layers)]
        self.kv_bytes = 2 * model_cfg.num_layers * int(np.prod(shape)) * \
            jnp.dtype(kv_dtype).itemsize

    # ------------------------------------------------------------------------- shapes

    def rows(self, packed: int, kind: str = "pooled") -> int:
        """Sequence rows of the step with ``packed`` token slots (every sequence has >= 1
        token, and the engine never batches more than ``max_batch``)."""
        return min(packed, self._max_rows[kind])

    def width(self, packed: int) -> int:
        """Page-table width W: the pages of the longest sequence such a step can hold."""
        return -(-min(packed, self.max_model_len) // self.page_size)

    def shapes(self, kind: str = "pooled") -> list[tuple[int, int]]:
        """Every (rows, P) compiled for ``kind``."""
        return [(self.rows(p, kind), p) for p in self.packed[kind]]

    def step_shape(self, kind: str, lengths: Sequence[int]) -> tuple[tuple[int, int], int]:
        total = sum(lengths)
        for p in self.packed[kind]:
            if p >= total:
                if len(lengths) > self.rows(p, kind):
                    break
                return (self.rows(p, kind), p), p
        raise ValueError(f"{len(lengths)} sequences of {total} tokens do not fit one "
                         f"{kind!r} step (at most {self.packed[kind][-1]} tokens, "
                         f"{self._max_rows[kind]} sequences)")

    # ------------------------------------------------------------------------- compile

    def _model(self, pure: dict[str, Any]) -> Any:
        state = jax.tree_util.tree_map(lambda x: x, self._state_template)
        nnx.replace_by_pure_dict(state, pure)
        return nnx.merge(self.graphdef, state)

    def _step_fn(self, kind: str) -> Any:
        pooling_type = self.pooling_type

        def step(state: dict[str, Any], kv: KVCache,
                 inp: StepInputs) -> tuple[jax.Array, KVCache]:
            h, kv = self._model(state)(kv, inp)  # [P, D], after the final norm
            if kind == "pooled":
                return pool_packed(h, inp.cu_q_lens, pooling_type), kv  # f32[S, D]
            return h.astype(jnp.float32), kv  # f32[P, D]

        return step

    def _compile(self, kind: str, shape: tuple[int, int]) -> Any:
        rows, p = shape
        w = self.width(p)
        i32 = jnp.int32
        inp = StepInputs(
            token_ids=jax.ShapeDtypeStruct((p,), i32),
            positions=jax.ShapeDtypeStruct((p,), i32),
            slot_mapping=jax.ShapeDtypeStruct((p,), i32),
            page_table=jax.ShapeDtypeStruct((rows, w), i32),
            kv_lens=jax.ShapeDtypeStruct((rows,), i32),
            cu_q_lens=jax.ShapeDtypeStruct((rows + 1,), i32),
            logits_indices=jax.ShapeDtypeStruct((rows,), i32))
        kv = [(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype))
              for k, v in self._kv]
        step = jax.jit(self._step_fn(kind), donate_argnums=(1,))
        return step.lower(self._state, kv, inp).compile()

    # ------------------------------------------------------------------------- run

    def pack(self, kind: str, token_ids: Sequence[Sequence[int]]) -> StepInputs:
        """The host-side ``StepInputs`` of one step over ``token_ids`` (see the module
        docstring for the layout)."""
        lens = [len(x) for x in token_ids]
        if min(lens) < 1:
            raise ValueError("every sequence must have at least one token")
        (rows, p), _ = self.step_shape(kind, lens)
        b = self.page_size
        chunks, first_page = [], 1
        for seq, n in zip(token_ids, lens, strict=True):
            n_pages = -(-n // b)  # a run of fresh pages per sequence, after the null page
            chunks.append((seq, 0, range(first_page, first_page + n_pages)))
            first_page += n_pages
        return pack_step_inputs(chunks, p, rows, self.width(p), b)

    def _run(self, kind: str, token_ids: Sequence[Sequence[int]],
             token_type_ids: Sequence[Sequence[int] | None] | None) -> list[np.ndarray]:
        n = len(token_ids)
        inp = self.pack(kind, token_ids)
        shape = (int(inp.kv_lens.shape[0]), int(inp.token_ids.shape[0]))
        exe = self._executable(kind, shape)
        try:
            out, self._kv = exe(self._state, self._kv, inp)
            host = np.asarray(out)
        except Exception:
            # The old cache may already be donated; its contents never matter between steps.
            self._kv = [(jnp.zeros(k.shape, k.dtype), jnp.zeros(v.shape, v.dtype))
                        if k.is_deleted() or v.is_deleted() else (k, v)
                        for k, v in self._kv]
            raise
        if kind == "hidden":
            cu = inp.cu_q_lens
            return [host[cu[i]:cu[i + 1]] for i in range(n)]
        return [host[i] for i in range(n)]


# ----------------------------------------------------------------------------- loading


def check_decoder_embedding_source(path: Path) -> None:
    """Refuse, before any weights are read, HF checkpoints of a family the loader does not
    know, and those this causal path would compute differently: bidirectional decoders
    (EmbeddingGemma-style ``use_bidirectional_attention``, ``is_causal: false``) and
    sequence-classification heads."""
    cfg_path = path / "config.json" if path.is_dir() else None
    if cfg_path is None or not cfg_path.exists():
        return
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_path} is not valid JSON: {e}") from None
    try:
        ModelConfig.from_hf(cfg)
    except (ValueError, KeyError) as e:
        raise ModelLoadError(f"--task embed: {path}: {e}") from None
    text = cfg.get("text_config") or cfg
    if text.get("use_bidirectional_attention") or text.get("is_causal") is False:
        raise ModelLoadError(f"{path}: this decoder uses bidirectional attention, which the "
                             "decoder embedding path (causal) does not support")
    arch = (cfg.get("architectures") or [""])[0]
    if arch.endswith("ForSequenceClassification"):
        raise ModelLoadError(f"{path}: {arch} (a classification head on a decoder) is not "
                             "supported; decoder models serve --task embed only")


def load_decoder_pooling(
    args: Any, source: Path, *, dtype: str, max_model_len: int | None,
    runner_options: dict[str, Any] | None = None,
) -> tuple[DecoderPoolingRunner, DecoderPoolingConfig, PoolerConfig, Any, str]:
    """Load a decoder for ``--task embed``: (runner, engine config, pooler, tokenizer, name).

    ``source`` is the resolved model path (GGUF file, HF directory or orbax checkpoint);
    ``runner_options`` override ``DecoderPoolingRunner`` arguments (tests: small buckets).
    Raises ``ModelLoadError`` for a family the loader does not know, a bidirectional or
    classification checkpoint, parallelism options, or bad arguments.
    """
    from ops.backend import get_attention_fn

    if (getattr(args, "tensor_parallel_size", 1) or 1) > 1 \
            or (getattr(args, "data_parallel_size", 1) or 1) > 1 or getattr(args, "mesh", None):
        raise ModelLoadError("--task embed on a decoder runs on one device; drop "
                             "--tensor-parallel-size / --data-parallel-size / --mesh")
    check_decoder_embedding_source(source)
    model_dir = source if source.is_dir() else None
    try:
        pooler = resolve_pooler_config(
            model_dir, is_decoder=True, override=getattr(args, "override_pooler_config", None))
        attn_fn, write_fn, _ = get_attention_fn(getattr(args, "attention_backend", "auto"))
    except ValueError as e:  # PoolerConfigError, unknown backend
        raise ModelLoadError(str(e)) from None
    try:
        # The model argument, not ``source``: an asset alias (or None) keeps its hub name.
        loaded = load_model(getattr(args, "model", None), dtype=dtype, attn_fn=attn_fn,
                            write_fn=write_fn, cache_dir=getattr(args, "cache_dir", None),
                            tokenizer_path=getattr(args, "tokenizer", None), progress=False)
    except ModelLoadError as e:
        raise ModelLoadError(f"--task embed: {e} (decoder embeddings need one of the "
                             "generation families; encoders need a BERT-family directory)"
                             ) from None
    cfg = loaded.config
    length = int(max_model_len or cfg.max_position_embeddings)
    if length > cfg.max_position_embeddings:
        logger.warning("max_model_len %d exceeds the model's %d positions", length,
                       cfg.max_position_embeddings)
    try:
        options: dict[str, Any] = {
            "max_num_seqs": getattr(args, "max_num_seqs", 32),
            "max_num_batched_tokens": getattr(args, "max_num_batched_tokens", None),
            "page_size": getattr(args, "block_size", 16) or 16,
            "kv_dtype": loaded.dtype,
            **(runner_options or {})}
        runner = DecoderPoolingRunner(loaded.model, cfg, pooler.pooling_type,
                                      max_model_len=length, **options)
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
    hf = {}
    if model_dir is not None and (model_dir / "config.json").exists():
        hf = json.loads((model_dir / "config.json").read_text())
    mdims = hf.get("matryoshka_dimensions")
    arch = (hf.get("architectures") or [f"{cfg.model_type} (GGUF)"])[0]
    info = DecoderPoolingConfig(
        architecture=arch, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        matryoshka_dimensions=tuple(int(d) for d in mdims) if mdims else None,
        is_matryoshka=bool(hf.get("is_matryoshka", False) or mdims))
    tokenizer = loaded.tokenizer
    if tokenizer is not None:
        tokenizer.truncation_side = "left"  # truncation keeps a prompt's end, as vLLM does
    logger.info("decoder embedding model: scratch KV cache %d pages x %d tokens (%.1f MiB)",
                runner.num_pages, runner.page_size, runner.kv_bytes / 2**20)
    return runner, info, pooler, tokenizer, loaded.name
