"""The engine's compiled step, sampler included, lowered for ``cuda`` or ``tpu`` from abstract
arrays: what ``ModelRunner.warmup`` would compile on that platform with
``--attention-backend pallas``, with no weight in memory and no device of that platform.

Module-level functions, so that the 8-device mesh worker (``tests/sharding/conftest.py``) can run
them. Shapes: ``bench.random_models.SHAPES`` (SmolLM2-135M, the default model; Llama-3-8B;
Gemma-3-12B), bfloat16, the engine's defaults (``EngineArgs``: page size, max_num_seqs) and the
token budget it picks on an accelerator (2048: buckets 1, 2, 4, ..., 2048).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bench.random_models import SHAPES
from models.config import ModelConfig
from models.registry import build_model
from ops.backend import get_attention_fn
from serving.engine.config import EngineArgs
from serving.engine.model_runner import KVLayout, ModelRunner, RunnerConfig
from serving.engine.sharded import sharded_decoder
from sharding.mesh import MeshShape, make_mesh, replica_meshes
from sharding.sharder import Sharder
from tests.platforms.exports import assert_clean, export_for, module_facts

PLATFORMS = ("cuda", "tpu")
KERNELS = {"cuda": "gpu", "tpu": "tpu"}  # export platform -> ops.backend platform
ACCELERATOR_TOKEN_BUDGET = 2048  # LLMEngine's max_num_batched_tokens off CPU
MAX_MODEL_LEN = 8192
NUM_PAGES = 4096  # abstract: any pool size costs nothing here
MESHES = {"tp8": MeshShape(1, 8), "dp2xtp4": MeshShape(2, 4)}


def model_config(name: str, num_layers: int | None = None) -> ModelConfig:
    """``SHAPES[name]``, optionally cut to ``num_layers`` identical-shaped layers (the default
    run; every layer lowers the same ops). A Gemma config keeps a sliding and a global layer."""
    d = dict(SHAPES[name])
    if num_layers is not None:
        if d.get("sliding_layers"):
            d["sliding_layers"] = tuple(i < num_layers - 1 for i in range(num_layers))
        d["num_layers"] = num_layers
    return ModelConfig(**d)


def abstract_runner(name: str, platform: str, *, num_layers: int | None = None,
                    sharder: Sharder | None = None) -> ModelRunner:
    """A runner of ``name``'s shape with the ``platform``'s Pallas kernels, abstract weights
    (sharded as ``sharder``'s mesh places them) and an abstract KV cache."""
    cfg = model_config(name, num_layers)
    ops = get_attention_fn("pallas", platform=KERNELS[platform])
    dtype = jnp.bfloat16
    if sharder is None:
        model = build_model(cfg, dtype, ops.attention, ops.write_kv, abstract=True)
    else:
        cfg, model = sharded_decoder(cfg, dtype, ops.attention, ops.write_kv, sharder)
        for _, p in nnx.iter_graph(model):
            if isinstance(p, nnx.Param):
                shape = tuple(p.shape)
                axes = p.get_metadata().get("logical_axes", (None,) * len(shape))
                p.set_value(jax.ShapeDtypeStruct(shape, p.dtype,
                                                 sharding=sharder.sharding(axes, shape)))
    args = EngineArgs()
    rc = RunnerConfig(args.block_size, NUM_PAGES, args.max_num_seqs,
                      ACCELERATOR_TOKEN_BUDGET, MAX_MODEL_LEN)
    kv = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype)
    return ModelRunner(model, rc, kv, sharder, abstract=True)


def check_bucket(runner: ModelRunner, platform: str, t: int, done: set[tuple[str, int]]
                 ) -> list[str]:
    """Export bucket ``t``'s step, sampler and argmax for ``platform`` and check each module
    (``exports.assert_clean``): the step holds one attention and one KV-write kernel per layer,
    its KV cache arguments are all aliased to results, no op makes a whole cache anew (global
    or per-shard size); the sampler and argmax hold no custom call. Sampler variants already in
    ``done`` (buckets share S) are not exported again; ``done`` is updated. Returns the labels
    of what passed."""
    step, *samplers = runner.variants(t)
    n_state = len(jax.tree_util.tree_leaves(step.args[0]))
    caches = jax.tree_util.tree_leaves(step.args[1])
    cache = caches[0]
    shapes = [cache.shape]
    if cache.sharding is not None:
        shapes.append(cache.sharding.shard_shape(cache.shape))
    exp = export_for(platform, step.fn, step.args, step.donate)
    layers = len(caches) // 2
    assert_clean(module_facts(exp, shapes), platform, kernels=2 * layers,
                 aliased_args=range(n_state, n_state + len(caches)))
    labels = [f"{platform} step[T={t}]"]
    for v in samplers:
        if v.key in done:
            continue
        done.add(v.key)
        exp = export_for(platform, v.fn, v.args, v.donate)
        assert_clean(module_facts(exp), platform, kernels=0)
        labels.append(f"{platform} {v.key[0]}[S={v.key[1]}]")
    return labels


def check_model(name: str, platform: str, num_layers: int | None = None,
                buckets: tuple[int, ...] | None = None) -> list[str]:
    """Every bucket (or ``buckets``) of ``name`` on one device; returns what passed."""
    runner = abstract_runner(name, platform, num_layers=num_layers)
    out: list[str] = []
    done: set[tuple[str, int]] = set()
    for t in buckets or tuple(runner.cfg.token_buckets):
        out += [f"{name} 1dev {x}" for x in check_bucket(runner, platform, t, done)]
    return out


def check_model_on_mesh(name: str, platform: str, mesh: str, num_layers: int | None = None,
                        buckets: tuple[int, ...] | None = None) -> list[str]:
    """Run in the 8-device worker: the step with its real shardings on ``MESHES[mesh]``. With
    data parallelism each replica is its own engine on its own ``(1, tp)`` mesh; every replica
    is exported (device ids differ, the program must not)."""
    meshes = replica_meshes(make_mesh(MESHES[mesh]))
    out: list[str] = []
    for i, m in enumerate(meshes):
        runner = abstract_runner(name, platform, num_layers=num_layers, sharder=Sharder(m))
        done: set[tuple[str, int]] = set()
        for t in buckets or tuple(runner.cfg.token_buckets):
            out += [f"{name} {mesh} replica{i} {x}"
                    for x in check_bucket(runner, platform, t, done)]
    return out
