"""Engine configuration: the user-facing ``EngineArgs`` and the frozen per-stage configs.

``EngineArgs`` mirrors the ``serve`` CLI's engine options (vLLM's long names with ``-`` as ``_``);
``serving.cli`` fills it from the command line and YAML, the offline ``LLM`` API from keyword
arguments. ``EngineArgs.resolve`` turns it, together with the loaded model's config, into the
validated frozen configs each stage reads.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineArgs:
    model: str | None = None  # path, GGUF file, hub id or asset alias; None: the default model
    tokenizer: str | None = None  # a separate tokenizer path (HF dir); None: the model's own
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 ("auto": f32 on CPU, bf16 else)
    max_model_len: int | None = None  # None: the model's context length
    max_num_seqs: int = 32
    max_num_batched_tokens: int | None = None  # None: chosen from max_num_seqs and the backend
    # Compiled token buckets (each step is padded to the smallest that holds it); None: powers
    # of two from 1 (16 for pooling models) up to max_num_batched_tokens, which is always one.
    token_buckets: tuple[int, ...] | None = None
    block_size: int = 16  # tokens per KV page
    num_kv_pages: int | None = None  # None: sized from kv_cache_memory_fraction / kv_cache_gb
    kv_cache_gb: float | None = None  # explicit KV pool size in GiB
    kv_cache_memory_fraction: float = 0.9  # of device memory left after weights (accelerators)
    enable_prefix_caching: bool = True
    generation_config: str = "auto"  # "auto": model's defaults; "vllm": none; or a folder path
    seed: int = 0
    cache_dir: str | None = None  # asset + compilation cache root (default ~/.cache/xlaserve)
    compilation_cache: bool = True  # JAX persistent compilation cache under cache_dir
    attention_backend: str = "auto"  # auto | reference | pallas | pallas-interpret
    max_logprobs: int = 20
    # What the engine serves (serving.engine.engine.serving_tasks). "auto": generate for
    # decoders, the architecture's pooling tasks for BERT-family encoders; embed/embedding,
    # classify, score ask for pooling explicitly (embed on a decoder: last-token embeddings of
    # its final hidden states); generate refuses encoders.
    task: str = "auto"
    override_pooler_config: str | None = None  # JSON: {"pooling_type": "MEAN", "normalize": true}
    # ---- parallelism (sharding/, serving/engine/sharded.py; docs/SHARDING.md) ----
    tensor_parallel_size: int = 1  # shards of each weight / KV cache over the mesh's "model" axis
    data_parallel_size: int = 1  # engine replicas (DataParallelClient), each on its own devices
    mesh: str | None = None  # "data=D,model=M" or "DxM"; overrides the two sizes above
    distributed_coordinator: str | None = None  # HOST:PORT of process 0 (jax.distributed)
    num_processes: int | None = None  # processes in a multi-host run (None: JAX_NUM_PROCESSES)
    process_id: int | None = None  # this process's index (None: JAX_PROCESS_ID)
