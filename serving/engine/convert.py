"""``xlaserve-convert MODEL --output DIR [--dtype ...]``: any model source → an orbax checkpoint.

The output directory (layout in ``models.orbax_source``) holds the weights in our own parameter
layout as an orbax checkpoint, with the HF config, tokenizer, chat template and generation config
beside them, so ``serve DIR`` needs nothing else. Restoring reads each device's slice straight into
its sharding (``sharding.sharder.Placement.restore_target``), with no dequantisation or re-layout:
the fast-restart and multi-host path.

The marker file is written last: a conversion that fails half-way leaves a directory the loader
does not mistake for a checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("xlaserve.convert")


def hf_config_of(cfg: Any) -> dict[str, Any]:
    """An HF ``config.json`` dict that ``ModelConfig.from_hf`` maps back to ``cfg`` (used when
    the source has none, e.g. an in-memory test model)."""
    gemma = cfg.is_gemma
    d: dict[str, Any] = {
        "model_type": cfg.model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": cfg.attention_bias,
        "hidden_activation" if gemma else "hidden_act": cfg.hidden_act,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids) or None,
        "final_logit_softcapping": cfg.final_logit_softcapping,
        "attn_logit_softcapping": cfg.attn_logit_softcapping,
    }
    if cfg.sliding_window:
        d["sliding_window"] = cfg.sliding_window
        if gemma:
            d["layer_types"] = ["sliding_attention" if s else "full_attention"
                                for s in cfg.sliding_layers]
        else:
            d["use_sliding_window"] = True
    if gemma:
        d["rope_local_base_freq"] = cfg.rope_local_base_freq
        d["query_pre_attn_scalar"] = cfg.query_pre_attn_scalar
    return d


def source_hf_config(source: str) -> dict[str, Any] | None:
    """The HF config of the file or directory a model was loaded from (None: none on disk)."""
    path = Path(source)
    if path.is_dir() and (path / "config.json").is_file():
        return dict(json.loads((path / "config.json").read_text()))
    if path.suffix == ".gguf" or (path.is_dir() and any(path.glob("*.gguf"))):
        from models.gguf import load_gguf_config
        return load_gguf_config(path)
    return None


def convert_loaded(loaded: Any, output: str | Path, *, dtype: Any = None,
                   hf_config: dict[str, Any] | None = None, force: bool = False) -> Path:
    """Write ``loaded`` (a ``models.registry.LoadedModel``) as a checkpoint directory."""
    import jax.numpy as jnp

    from models.config import ModelConfig
    from models.orbax_source import FORMAT, MARKER, PARAMS, VERSION, save_params
    out = Path(output).expanduser()
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} exists and is not empty (pass --force to replace it)")
        if not (out / MARKER).is_file() and not (out / PARAMS).exists():
            raise FileExistsError(f"{out} is not an xlaserve checkpoint; refusing to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    jdtype = jnp.dtype(dtype if dtype is not None else loaded.dtype)
    hf = dict(hf_config) if hf_config is not None else hf_config_of(loaded.config)
    if ModelConfig.from_hf(hf) != loaded.config:
        raise ValueError("the HF config does not describe the loaded model (was it sharded with "
                         "replicated kv heads? convert an unsharded model)")
    t0 = time.perf_counter()
    manifest = save_params(loaded.model, out, jdtype)
    (out / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
    (out / "generation_config.json").write_text(
        json.dumps(loaded.generation_config, indent=2, sort_keys=True))
    loaded.tokenizer.save_pretrained(str(out))
    if getattr(loaded.tokenizer, "chat_template", None) and \
            not (out / "chat_template.jinja").is_file():
        (out / "chat_template.jinja").write_text(loaded.tokenizer.chat_template)
    meta = {"format": FORMAT, "version": VERSION, "dtype": jdtype.name, "name": loaded.name,
            "source": loaded.source, "model_config": _jsonable(dataclasses.asdict(loaded.config)),
            "params": manifest}
    (out / MARKER).write_text(json.dumps(meta, indent=1))
    log.info("wrote %s (%d arrays, %s) in %.1fs", out, len(manifest), jdtype.name,
             time.perf_counter() - t0)
    return out


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=list))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="xlaserve-convert",
        description="Convert a model (GGUF file, HF directory, asset alias, or another checkpoint) "
                    "to an orbax checkpoint directory that `serve DIR` restores into any mesh.")
    ap.add_argument("model", help="model path, GGUF file, hub id or asset alias")
    ap.add_argument("--output", "-o", required=True, help="checkpoint directory to write")
    ap.add_argument("--dtype", default="auto",
                    help="stored dtype: auto (as loaded: float32 on CPU), float32, bfloat16, "
                         "float16")
    ap.add_argument("--tokenizer", default=None, help="a separate tokenizer directory")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--force", action="store_true", help="replace an existing checkpoint")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from models.loader import load_model
    from models.registry import ModelLoadError
    try:
        loaded = load_model(args.model, dtype=args.dtype, cache_dir=args.cache_dir,
                            tokenizer_path=args.tokenizer)
        out = convert_loaded(loaded, args.output, hf_config=source_hf_config(loaded.source),
                             force=args.force)
    except (ModelLoadError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    import jax.numpy as jnp
    print(f"{out}: {loaded.name} ({loaded.config.model_type}, {jnp.dtype(loaded.dtype).name}); "
          f"serve it with: serve {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
