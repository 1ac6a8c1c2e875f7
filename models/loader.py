"""One loader API for every model source: HF directory, GGUF file, hub id, or PyPI asset alias.

``load_model(spec)`` resolves the source, builds the family's module abstractly (no weight-sized
allocation), streams tensors into it one at a time, and returns a ``LoadedModel``. Every failure a
user can cause is a ``ModelLoadError`` with a one-line message; the CLI prints it and exits 1.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from models import assets
from models.config import ModelConfig
from models.gemma3 import Gemma3Model
from models.inputs import AttentionFn, WriteKVFn
from models.llama import LlamaModel
from models.weights import Place, default_place, load_weights


class ModelLoadError(RuntimeError):
    """A user-facing, one-line load failure (missing path, corrupt file, unsupported model…)."""


@dataclass
class LoadedModel:
    config: ModelConfig
    model: nnx.Module
    tokenizer: Any  # transformers.PreTrainedTokenizerFast
    generation_config: dict[str, Any]
    name: str  # default served model name
    source: str  # resolved path
    dtype: Any
    load_seconds: float = 0.0


FAMILIES: dict[str, type] = {
    "llama": LlamaModel, "mistral": LlamaModel, "qwen2": LlamaModel, "qwen3": LlamaModel,
    "gemma3_text": Gemma3Model,
}


def resolve_dtype(dtype: str) -> Any:
    if dtype == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    table = {"float32": jnp.float32, "float": jnp.float32, "bfloat16": jnp.bfloat16,
             "float16": jnp.float16, "half": jnp.float16}
    if dtype not in table:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose auto, float32, bfloat16, float16")
    return table[dtype]


def build_model(cfg: ModelConfig, dtype: Any, attn_fn: AttentionFn, write_fn: WriteKVFn,
                abstract: bool = False) -> nnx.Module:
    family = FAMILIES[cfg.model_type]
    make: Callable[[], nnx.Module] = lambda: family(cfg, dtype, attn_fn, write_fn)
    return nnx.eval_shape(make) if abstract else make()


def random_model(cfg: ModelConfig, dtype: Any, attn_fn: AttentionFn, write_fn: WriteKVFn,
                 seed: int = 0, scale: float = 0.5) -> nnx.Module:
    """A model with random weights (tests and GPU benchmarks where no checkpoint can be had)."""
    model = build_model(cfg, dtype, attn_fn, write_fn, abstract=True)
    rng = np.random.default_rng(seed)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param):
            shape = tuple(node.shape)
            fan_in = shape[0] if len(shape) > 1 else 1
            if len(shape) == 1:
                val = 1.0 + 0.1 * rng.standard_normal(shape)
            else:
                val = rng.standard_normal(shape) * (scale / np.sqrt(fan_in))
            node.set_value(jax.device_put(val.astype(jnp.dtype(dtype))))
    return model


def resolve_source(spec: str | None, cache_dir: str | None = None) -> Path:
    """Map a model argument to a local path (GGUF file or HF directory)."""
    if spec is None:
        spec = assets.DEFAULT_MODEL
    spec = assets.HUB_ALIASES.get(spec, spec)
    if spec in assets.ASSETS:
        try:
            return assets.fetch(spec, cache_dir)
        except assets.AssetError as e:
            raise ModelLoadError(str(e)) from None
    path = Path(spec).expanduser()
    if path.exists():
        return path
    looks_like_path = spec.startswith((".", "/", "~")) or spec.endswith(".gguf") \
        or spec.count("/") != 1
    if looks_like_path:
        raise ModelLoadError(f"model path {spec!r} does not exist")
    return _from_hub(spec)


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover
        raise ModelLoadError("huggingface_hub is not installed; pass a local path") from None
    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        kind = type(e).__name__
        raise ModelLoadError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({kind}); if this machine is "
            f"offline, pass a local path instead: an HF model directory or a .gguf file") from None


def _hf_dir_tensors(path: Path) -> tuple[list[Path], int]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors weights")
    from safetensors import safe_open
    count = 0
    for f in files:
        with safe_open(str(f), "numpy") as sf:
            count += len(list(sf.keys()))
    return files, count


def _iter_safetensors(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    from safetensors import safe_open
    for f in files:
        with safe_open(str(f), "numpy") as sf:
            for name in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, sf.get_tensor(name).astype(np.float32)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None


def load_model(spec: str | None, *, dtype: str = "auto", attn_fn: AttentionFn | None = None,
               write_fn: WriteKVFn | None = None, cache_dir: str | None = None,
               place: Place = default_place, tokenizer_path: str | None = None,
               progress: bool = True) -> LoadedModel:
    """Resolve ``spec``, build the model for ``dtype`` and fill its weights."""
    from ops import attention as ref_ops
    attn_fn = attn_fn or ref_ops.ragged_paged_attention_reference
    write_fn = write_fn or ref_ops.write_kv
    t0 = time.perf_counter()
    jdtype = resolve_dtype(dtype)
    path = resolve_source(spec, cache_dir)
    # ---- orbax checkpoint directories (xlaserve-convert; models/orbax_source.py) -----------
    from models.orbax_source import is_orbax_checkpoint, load_orbax
    if is_orbax_checkpoint(path):
        return load_orbax(path, dtype=dtype, attn_fn=attn_fn, write_fn=write_fn, place=place,
                          tokenizer_path=tokenizer_path, t0=t0)
    # ---------------------------------------------------------------------------------------
    gguf_file = path if path.is_file() else None
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            gguf_file = ggufs[0]
        elif not ggufs:
            raise ModelLoadError(f"{path} has neither config.json nor a .gguf file")
        else:
            raise ModelLoadError(f"{path} holds several .gguf files; pass one of them")
    tensors: Iterator[tuple[str, np.ndarray]]
    if gguf_file is not None:
        from models.gguf import GGUFError, load_gguf
        try:
            g = load_gguf(gguf_file)
            hf_cfg, tokenizer, gen_cfg = g.hf_config, g.tokenizer, dict(g.generation_config)
        except GGUFError as e:
            raise ModelLoadError(str(e)) from None
        tensors, total = g.tensors(), None
        name = gguf_file.stem
    else:
        hf_cfg = _read_json(path / "config.json")
        gen_cfg = _read_json(path / "generation_config.json")
        files, total = _hf_dir_tensors(path)
        tensors = _iter_safetensors(files)
        from models.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(str(tokenizer_path or path))
        name = path.name
    if tokenizer_path and gguf_file is not None:
        from models.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(tokenizer_path)
    try:
        cfg = ModelConfig.from_hf(hf_cfg)
    except (ValueError, KeyError) as e:
        raise ModelLoadError(f"{path}: {e}") from None
    model = build_model(cfg, jdtype, attn_fn, write_fn, abstract=True)
    if progress:
        tensors = tqdm(tensors, total=total, desc="loading weights", unit="tensor",
                       file=sys.stderr, disable=not progress)
    try:
        load_weights(model, cfg, tensors, jdtype, place)
    except ValueError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    if spec in assets.ASSETS or spec is None:
        name = assets.HUB_NAME.get(spec or assets.DEFAULT_MODEL, name)
    return LoadedModel(cfg, model, tokenizer, gen_cfg, name, str(path), jdtype,
                       time.perf_counter() - t0)


def generation_defaults(gen_cfg: dict[str, Any]) -> dict[str, Any]:
    """Sampling defaults a model's generation_config.json sets (vLLM's 'auto' behaviour)."""
    keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
    out = {k: gen_cfg[k] for k in keys if gen_cfg.get(k) is not None}
    if "max_new_tokens" in gen_cfg and gen_cfg["max_new_tokens"] is not None:
        out["max_tokens"] = gen_cfg["max_new_tokens"]
    return out


