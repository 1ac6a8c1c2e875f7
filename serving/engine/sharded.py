"""The engine's side of sharding: a sharder from ``EngineArgs``, a loaded model rebuilt for its
mesh, the start-up memory report, and the multi-host follower loop.

Called by ``LLMEngine.__init__`` (``make_sharder``, ``shard_loaded``, ``log_layout``) and by
``serving.engine.data_parallel`` (one sharder per replica). The model-specific knowledge needed to
shard (the config's head counts, the family constructor) stays here so that ``sharding/`` never
imports ``models``. Decoders and BERT-family encoders shard the same way: parameters by their
logical axes, attention wrapped in ``shard_map`` over heads.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import numpy as np
from flax import nnx

from models.bert import BertConfig
from models.config import ModelConfig
from models.registry import LoadedModel, build_model
from ops.attention import ragged_encoder_attention_reference
from serving.engine.config import EngineArgs
from sharding.kernels import ShardedAttention, ShardedEncoderAttention, ShardedWriteKV, unwrap
from sharding.mesh import MeshError, make_mesh, resolve_shape
from sharding.sharder import Sharder

log = logging.getLogger("xlaserve.sharding")


def make_sharder(args: EngineArgs, loaded: LoadedModel | None = None,
                 devices: list[Any] | None = None) -> Sharder | None:
    """The sharder for one engine, or None for a plain single-device engine.

    When the model is still to be loaded (``loaded`` None), its config is read first (file
    headers only) so that a mesh its heads cannot split is refused before any weight is read.
    """
    shape = resolve_shape(args.tensor_parallel_size, args.data_parallel_size, args.mesh)
    if shape.data > 1:
        raise MeshError(
            f"data_parallel_size={shape.data} runs one engine per replica: build it with "
            f"serving.engine.data_parallel.DataParallelClient.from_args, not LLMEngine")
    if jax.process_count() > 1 and shape.num_devices != jax.device_count():
        raise MeshError(
            f"a multi-host run shards one engine over every device: tensor_parallel_size must "
            f"be {jax.device_count()} (all {jax.process_count()} processes' devices), got "
            f"{shape.model}")
    if shape.model == 1 and jax.process_count() == 1:
        return None
    sharder = Sharder(make_mesh(shape, devices))
    if loaded is None:
        _preflight(args, sharder)
    return sharder


def _preflight(args: EngineArgs, sharder: Sharder) -> None:
    from models.config import ModelConfig
    from models.loader import resolve_source
    from models.registry import ModelLoadError
    from serving.engine.convert import source_hf_config
    path = resolve_source(args.model, args.cache_dir)
    hf = source_hf_config(str(path))
    if hf is None:
        return  # unknown layout: load_model reports it
    try:
        if hf.get("model_type") in ("bert", "roberta", "xlm-roberta", "camembert"):
            cfg_e = BertConfig.from_hf(hf)
            n = cfg_e.num_attention_heads
            sharder.kv_replicas(n, n)
        else:
            cfg = ModelConfig.from_hf(hf)
            sharder.kv_replicas(cfg.num_heads, cfg.num_kv_heads)
    except ValueError as e:
        raise ModelLoadError(f"{path}: {e}") from None


def _attention_ops(model: nnx.Module) -> tuple[Any, Any]:
    for _, node in nnx.iter_graph(model):
        if hasattr(node, "attn_fn") and hasattr(node, "write_fn"):
            return node.attn_fn, node.write_fn
    raise ValueError("model has no attention layer")


def _params(model: nnx.Module) -> dict[str, nnx.Param]:
    return {".".join(str(p) for p in path): node for path, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Param)}


def sharded_decoder(cfg: ModelConfig, dtype: Any, attn_fn: Any, write_fn: Any,
                    sharder: Sharder) -> tuple[ModelConfig, nnx.Module]:
    """The decoder ``cfg`` rebuilt for ``sharder``'s mesh, abstract (no weights): its config
    with kv heads replicated as the mesh needs (raises ShardingError naming valid sizes when
    the heads do not split), and the model with ``attn_fn`` / ``write_fn`` (single-device ops,
    or already wrapped) in ``shard_map`` over kv heads. Parameters are placed by the caller."""
    r = sharder.kv_replicas(cfg.num_heads, cfg.num_kv_heads)
    new_cfg = dataclasses.replace(cfg, num_kv_heads=cfg.num_kv_heads * r) if r > 1 else cfg
    model = build_model(new_cfg, dtype, ShardedAttention(unwrap(attn_fn), sharder.mesh),
                        ShardedWriteKV(unwrap(write_fn), sharder.mesh), abstract=True)
    return new_cfg, model


def shard_loaded(loaded: LoadedModel, sharder: Sharder) -> LoadedModel:
    """``loaded`` rebuilt for ``sharder``'s mesh; ``loaded`` itself is left as it was.

    The new model has K' = K * r kv heads when the mesh replicates kv heads (r from
    ``Sharder.kv_replicas``; raises ShardingError naming valid sizes if the heads do not split)
    and attention wrapped in shard_map over kv heads. Weights already placed by ``sharder.place``
    (the loaders' hook) are reused as they are; others (a model built in memory, or placed for
    another mesh) are placed now, kv heads regrouped on the way.
    """
    cfg = loaded.config
    new_cfg: ModelConfig | BertConfig
    if isinstance(cfg, BertConfig):
        n = cfg.num_attention_heads
        sharder.kv_replicas(n, n)  # heads must split evenly (raises naming valid sizes)
        r, new_cfg = 1, cfg
        family: Any = type(loaded.model)  # BertModel or BertForSequenceClassification
        attn = ShardedEncoderAttention(ragged_encoder_attention_reference, sharder.mesh)
        model = nnx.eval_shape(lambda: family(cfg, loaded.dtype, attn_fn=attn))
    else:
        dec_cfg, model = sharded_decoder(cfg, loaded.dtype, *_attention_ops(loaded.model),
                                         sharder)
        r, new_cfg = dec_cfg.num_kv_heads // cfg.num_kv_heads, dec_cfg
    old = _params(loaded.model)
    for path, p in _params(model).items():
        axes = p.get_metadata().get("logical_axes", (None,) * len(p.shape))
        target = sharder.sharding(axes, tuple(p.shape))
        v = old[path][...]
        if isinstance(v, jax.Array) and v.shape == tuple(p.shape) and \
                v.sharding.is_equivalent_to(target, v.ndim):
            new = v
        elif isinstance(v, jax.Array) and v.shape == tuple(p.shape) and v.is_fully_addressable \
                and not sharder.multiprocess:
            new = jax.device_put(v, target)  # device to device
        else:
            new = sharder.place(path, axes, np.asarray(v))
        if new.shape != tuple(p.shape):
            raise ValueError(f"weight {path}: {new.shape} does not fit {tuple(p.shape)}")
        p.set_value(new)
    if r > 1 and not isinstance(cfg, BertConfig):
        log.info("kv heads replicated %dx for tensor_parallel_size=%d: %d query / %d kv heads "
                 "per shard", r, sharder.tp, cfg.num_heads // sharder.tp, 1)
    return dataclasses.replace(loaded, config=new_cfg, model=model)


def bytes_per_device(tree: Any) -> dict[Any, int]:
    """Bytes each (addressable) device holds of the arrays in ``tree``."""
    out: dict[Any, int] = {}
    for x in jax.tree_util.tree_leaves(tree):
        if isinstance(x, jax.Array):
            for shard in x.addressable_shards:
                out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def log_layout(sharder: Sharder, model: nnx.Module, kv: Any, num_pages: int,
               page_size: int) -> str:
    """The start-up memory line of a sharded engine (also returned, for tests)."""
    w = bytes_per_device(nnx.state(model))
    c = bytes_per_device(kv)
    mib = 2**20
    line = (f"{sharder.describe()}: weights {max(w.values()) / mib:.1f} MiB per device "
            f"({sum(w.values()) / mib:.1f} MiB on this process's devices), KV cache "
            f"{num_pages} pages x {page_size} tokens per device = {max(c.values()) / mib:.1f} "
            f"MiB per device, max concurrent tokens {(num_pages - 1) * page_size}")
    log.info("%s", line)
    return line
