"""Engine configuration: the user-facing ``EngineArgs`` and the frozen per-stage configs.

``EngineArgs`` mirrors the ``serve`` CLI's engine options (vLLM's long names with ``-`` as ``_``);
``serving.cli`` fills it from the command line and YAML, the offline ``LLM`` API from keyword
arguments. ``EngineArgs.resolve`` turns it, together with the loaded model's config, into the
validated frozen configs each stage reads.

Each field is declared with ``serving.options.option``: its default, help text and any special
parsing live on the field, and the ``serve`` option, its YAML key and its ``--help`` entry are
generated from it. Adding a field here adds the option; nothing else needs writing.
"""

from __future__ import annotations

from dataclasses import dataclass

from serving.engine.sampling_params import MAX_LOGPROBS
from serving.options import int_with_suffix, option

POOLING = "Pooling models (embeddings, scores)"
RELIABILITY = "Reliability"
PARALLELISM = "Parallelism"
_DTYPE_ALIASES = {"float": "float32", "half": "float16"}  # vLLM's (and torch's) short names


def _dtype(value: str) -> str:
    return _DTYPE_ALIASES.get(value, value)


def _buckets(value: str) -> tuple[int, ...]:
    """``16,64,256``: token buckets, positive integers."""
    try:
        out = tuple(int(x) for x in value.replace(" ", "").split(",") if x)
    except ValueError:
        raise ValueError(f"expected comma-separated token counts, got {value!r}") from None
    if not out or min(out) < 1:
        raise ValueError(f"token buckets must be positive, got {value!r}")
    return out


def _pooler_override(value: str) -> str:
    """A bad ``--override-pooler-config`` stops ``serve`` now, not after the model loads."""
    from models.pooling import parse_override  # imports JAX: only when the option is given

    parse_override(value)  # ValueError (JSON or PoolerConfigError) names the problem
    return value


@dataclass
class EngineArgs:
    model: str | None = option(
        None, "Model: a GGUF file, a Hugging Face-style directory, or an asset alias such as "
              "smollm2-135m-instruct. Default: the bundled SmolLM2-135M-Instruct.",
        positional=True)
    tokenizer: str | None = option(
        None, "A separate tokenizer (Hugging Face directory). Default: the model's.")
    dtype: str = option(
        "auto", "Weight and activation dtype ('auto': float32 on CPU, bfloat16 on accelerators; "
                "'float' and 'half' are accepted for float32 and float16).",
        choices=("auto", "float32", "bfloat16", "float16"), parse=_dtype)
    max_model_len: int | None = option(
        None, "Context length (prompt + output), e.g. 2048 or 4k (k = 1000, K = 1024). "
              "Default: the model's.", parse=int_with_suffix, metavar="TOKENS")
    max_num_seqs: int = option(32, "Most sequences in one batch.")
    max_num_batched_tokens: int | None = option(
        None, "Most tokens in one engine step. Default: 256 on CPU, 2048 on accelerators (at "
              "least --max-num-seqs); pooling models: enough for --max-num-seqs whole prompts, "
              "at most 8192 (at least --max-model-len).")
    token_buckets: tuple[int, ...] | None = option(
        None, "Token counts the engine compiles a step for, e.g. 16,64,256 (each step is padded "
              "to the smallest that holds it; --max-num-batched-tokens is always one). "
              "Default: powers of two from 1 (16 for pooling models).",
        parse=_buckets, metavar="T1,T2,...")
    block_size: int = option(16, "Tokens per KV-cache page.")
    kv_cache_dtype: str = option(
        "auto", "Storage dtype of the KV cache ('auto': the model's dtype, float32 on CPU). "
                "Keys and values are cast to it when written and attention computes in float32; "
                "float16 halves the cache's memory (twice the pages for --kv-cache-gb) and the "
                "bytes attention reads. Backends refuse at start-up what they cannot run: "
                "the native CPU kernels take float16 or float32, the Pallas kernels the model's "
                "dtype.",
        choices=("auto", "float16", "bfloat16", "float32"), parse=_dtype)
    num_kv_pages: int | None = option(
        None, "KV-cache pages in the pool. Default: sized from --kv-cache-gb or "
              "--kv-cache-memory-fraction.")
    kv_cache_gb: float | None = option(None, "KV-cache pool size in GiB.")
    kv_cache_memory_fraction: float = option(
        0.9, "Fraction of accelerator memory left after the weights that the KV cache may use.",
        aliases=("--gpu-memory-utilization",))
    enable_prefix_caching: bool = option(True, "Reuse KV pages of identical prompt prefixes.")
    generation_config: str = option(
        "auto", "Sampling defaults: 'auto' (the model's generation_config), 'vllm' (none: "
                "neutral defaults), or a folder holding generation_config.json.")
    seed: int = option(0, "Seed of the engine's sampling RNG.")
    cache_dir: str | None = option(
        None, "Model-asset and compilation cache (default ~/.cache/xlaserve or "
              "$XLASERVE_CACHE_DIR).")
    compilation_cache: bool = option(
        True, "Use JAX's persistent compilation cache under --cache-dir.")
    attention_backend: str = option(
        "auto", "Paged-attention implementation.",
        choices=("auto", "reference", "pallas", "pallas-interpret", "native"))
    cpu_weight_dtype: str = option(
        "f16", "Storage of the projection and LM-head weights for the native CPU kernels "
               "(--attention-backend native, or auto on a CPU that has them): 'f16' halves the "
               "bytes read per step (f32 accumulate; greedy output may differ slightly from "
               "f32), 'f32' keeps the loaded weights exactly, 'q8_0' stores int8 with one "
               "scale per 32 inputs and output (about half f16's bytes; quantized at load). "
               "BERT-family encoders always pack f32 (compute-bound; f16 moved their outputs "
               "off transformers').",
        choices=("f16", "f32", "q8_0"))
    # The same option as ServerArgs.max_logprobs (declared there, where requests are checked):
    # `serve --max-logprobs` sets both.
    max_logprobs: int = MAX_LOGPROBS
    # What the one engine serves (serving.engine.engine.serving_tasks).
    task: str = option(
        "auto", "What to serve. 'auto': text generation for decoder models; /v1/embeddings, "
                "/pooling, /score and /rerank for BERT-family encoders (sentence-transformers "
                "models), /score, /rerank and /classify for cross-encoders "
                "(…ForSequenceClassification). 'embed'/'embedding': embeddings from an encoder, "
                "or from a decoder (Llama/Qwen/Gemma 3 families; last-token pooling, "
                "normalised); 'classify'/'score' demand a cross-encoder.",
        choices=("auto", "generate", "embed", "embedding", "classify", "score"), group=POOLING)
    override_pooler_config: str | None = option(
        None, 'Pooling of an embedding model, over its sentence-transformers config: e.g. '
              '\'{"pooling_type": "CLS", "normalize": false}\' (pooling_type MEAN, CLS = first '
              'token, or LAST; defaults: CLS for encoders, LAST for decoders, normalize true).',
        parse=_pooler_override, metavar="JSON", group=POOLING)
    # ---- reliability (docs/RELIABILITY.md) ----
    engine_step_timeout: float = option(
        120.0, "Progress watchdog: an engine step running longer than this is a hang; in-flight "
               "requests fail, /health and /ready turn 503 and the server exits with code 1. "
               "0 turns the watchdog off.", metavar="SECONDS", group=RELIABILITY)
    enable_test_hooks: bool = option(
        False, "Allow the fault hook of the reliability tests ($XLASERVE_TEST_FAULT: "
               "raise@N, hang@N or oom@N makes engine step N raise, hang or run out of "
               "memory). Never in production: without this flag a set $XLASERVE_TEST_FAULT "
               "stops the server at startup.", group=RELIABILITY)
    # ---- parallelism (sharding/, serving/engine/sharded.py; docs/SHARDING.md) ----
    tensor_parallel_size: int = option(
        1, "Shard weights and the KV cache over this many devices (the mesh's 'model' axis).",
        aliases=("-tp",), group=PARALLELISM)
    data_parallel_size: int = option(
        1, "Independent engine replicas (DataParallelClient), each on its own tensor-parallel "
           "devices.", aliases=("-dp",), group=PARALLELISM)
    mesh: str | None = option(
        None, "Both sizes at once: 'data=D,model=M' or 'DxM' (overrides the two sizes above).",
        metavar="SPEC", group=PARALLELISM)
    distributed_coordinator: str | None = option(
        None, "Multi-host: process 0's address for jax.distributed (else "
              "$JAX_COORDINATOR_ADDRESS).", metavar="HOST:PORT", group=PARALLELISM)
    num_processes: int | None = option(
        None, "Multi-host: number of processes (else $JAX_NUM_PROCESSES).", group=PARALLELISM)
    process_id: int | None = option(
        None, "Multi-host: this process's index (else $JAX_PROCESS_ID); 0 serves HTTP, the "
              "others follow.", group=PARALLELISM)
