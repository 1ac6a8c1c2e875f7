"""Orbax checkpoint directories: our parameter tree saved once, restored straight into a mesh.

Written by ``serving.engine.convert`` (``xlaserve-convert MODEL --output DIR``); read (``load``)
when ``models.loader.load_model``'s path is such a directory. Layout::

    DIR/xlaserve_checkpoint.json   format marker: version, dtype, name, per-parameter manifest
    DIR/params/                    orbax StandardCheckpointer tree {param path: array}
    DIR/config.json                HF config (what ModelConfig.from_hf reads)
    DIR/generation_config.json     sampling defaults
    DIR/tokenizer.json, tokenizer_config.json, chat_template.jinja, ...   (save_pretrained)

Arrays are stored in our own layout (fused qkv ``[D, K, G+2, H]``, gate/up ``[D, 2, F]``,
transposed linears), so a restore is a read, never a conversion. The restore asks the ``place``
hook for each array's target sharding (``restore_target``, see ``sharding.sharder.Placement``):
tensorstore then reads only each device's slice, with no full host copy per device. With the
default hook everything lands on the default device.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.registry import (
    LoadedModel,
    LoadOptions,
    ModelLoadError,
    build_model,
    decoder_config,
    read_json,
    resolve_dtype,
    tokenizer_dir,
)

MARKER = "xlaserve_checkpoint.json"
PARAMS = "params"
FORMAT = "xlaserve-orbax"
VERSION = 1

Axes = tuple[str | None, ...]


@runtime_checkable
class RestoreTarget(Protocol):
    """What a sharding-aware ``place`` hook adds for orbax restores."""

    def restore_target(self, path: str, axes: Axes, shape: tuple[int, ...], dtype: Any
                       ) -> tuple[jax.ShapeDtypeStruct, Callable[[jax.Array], jax.Array] | None]:
        ...


def is_orbax_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / MARKER).is_file()


def param_table(model: nnx.Module) -> dict[str, nnx.Param]:
    """Every parameter by its dotted path (``layers.0.attn.qkv``), in graph order."""
    return {".".join(str(p) for p in path): node for path, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Param)}


def _axes(p: nnx.Param) -> Axes:
    return tuple(p.get_metadata().get("logical_axes", (None,) * len(p.shape)))


def save_params(model: nnx.Module, out_dir: Path, dtype: Any) -> dict[str, Any]:
    """Write ``model``'s parameters (cast to ``dtype``) under ``out_dir/params``; returns the
    manifest entry per parameter. Sharded arrays are written shard by shard."""
    import orbax.checkpoint as ocp
    tree: dict[str, jax.Array] = {}
    manifest: dict[str, Any] = {}
    for path, p in param_table(model).items():
        v = p[...]
        tree[path] = v if v.dtype == dtype else v.astype(dtype)
        manifest[path] = {"shape": list(v.shape), "logical_axes": list(_axes(p))}
    ckpt = ocp.StandardCheckpointer()
    ckpt.save((out_dir / PARAMS).resolve(), tree)
    ckpt.wait_until_finished()
    return manifest


def read_marker(path: Path) -> dict[str, Any]:
    try:
        meta = dict(json.loads((path / MARKER).read_text()))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path / MARKER}: unreadable checkpoint marker ({e})") from None
    if meta.get("format") != FORMAT or int(meta.get("version", 0)) > VERSION:
        raise ModelLoadError(f"{path}: not an {FORMAT} v{VERSION} checkpoint "
                             f"(format {meta.get('format')!r}, version {meta.get('version')})")
    return meta


def load(path: Path, opts: LoadOptions) -> LoadedModel[ModelConfig]:
    """Restore an ``xlaserve-convert`` directory. ``dtype="auto"`` keeps the stored dtype."""
    import orbax.checkpoint as ocp

    meta = read_marker(path)
    jdtype = jnp.dtype(meta["dtype"]) if opts.dtype == "auto" else resolve_dtype(opts.dtype)
    cfg = decoder_config(read_json(path / "config.json"), path)
    model = build_model(cfg, jdtype, opts.attn_fn, opts.write_fn, abstract=True)
    params = param_table(model)
    stored = meta.get("params", {})
    if set(stored) != set(params):
        missing, extra = sorted(set(params) - set(stored)), sorted(set(stored) - set(params))
        raise ModelLoadError(f"{path}: checkpoint does not match the model "
                             f"(missing {missing[:3]}, unexpected {extra[:3]})")
    targets: dict[str, jax.ShapeDtypeStruct] = {}
    fixes: dict[str, Callable[[jax.Array], jax.Array] | None] = {}
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    place = opts.place
    for name, p in params.items():
        shape = tuple(stored[name]["shape"])
        if shape != tuple(p.shape):
            raise ModelLoadError(f"{path}: weight {name} is stored as {shape}, the model "
                                 f"expects {tuple(p.shape)}")
        if isinstance(place, RestoreTarget):
            targets[name], fixes[name] = place.restore_target(name, _axes(p), shape, jdtype)
        else:
            targets[name], fixes[name] = jax.ShapeDtypeStruct(shape, jdtype,
                                                              sharding=default), None
    restored = ocp.StandardCheckpointer().restore((path / PARAMS).resolve(), targets)
    for name, p in params.items():
        fix = fixes[name]  # kv-head regrouping for a mesh that replicates kv heads
        p.set_value(restored[name] if fix is None else fix(restored[name]))
    tokenizer = tokenizer_dir(Path(opts.tokenizer_path or path))
    gen_cfg = read_json(path / "generation_config.json")
    return LoadedModel(cfg, model, tokenizer, gen_cfg, str(meta.get("name") or path.name),
                       str(path), jdtype, cfg.max_position_embeddings)
