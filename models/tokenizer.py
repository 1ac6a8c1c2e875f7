"""Tokenizers for both model sources, built without torch.

Called by ``models.gguf.load_gguf`` (``tokenizer_from_gguf``) and by the HF-directory and orbax
sources (``load_tokenizer``). Both return a transformers ``PreTrainedTokenizerFast`` carrying the
chat template and the special tokens, so later stages (chat rendering, detokenization, stop
tokens) do not care where the model came from. Failures are ``TokenizerError``.

GGUF: transformers' own GGUF tokenizer path (``AutoTokenizer.from_pretrained(gguf_file=...)``)
reads the file with a module that imports torch. We feed the same builder it uses
(``convert_gguf_tokenizer``) with metadata parsed by ``models.gguf``, arranged exactly as
transformers' ``get_gguf_tokenizer`` arranges it, so the ids equal the HF reference tokenizer's
(checked by tests/test_tokenizer.py against golden ids made with torch).

Building is slow (3.5 s for SmolLM2's merges, ~20 s for Gemma 3's 262k-token vocabulary, whose
merges must be derived), and deterministic, so the result is cached as a ``tokenizer.json`` under
``<cache>/tokenizers/<key>/``, where the key hashes the GGUF header bytes and the library
versions. A warm load reads that file instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gguf import Keys
from transformers import PreTrainedTokenizerFast

# Bump when the build below changes in a way that changes its output.
_BUILD_VERSION = "1"

# transformers' special-token kwargs and the GGUF metadata keys that hold their ids.
_SPECIAL_TOKEN_KEYS = {
    "bos_token": Keys.Tokenizer.BOS_ID,
    "eos_token": Keys.Tokenizer.EOS_ID,
    "unk_token": Keys.Tokenizer.UNK_ID,
    "pad_token": Keys.Tokenizer.PAD_ID,
}
# Files of an HF directory that transformers builds a tokenizer from (vocab.txt: BERT's WordPiece
# vocabulary, converted to a fast tokenizer).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


class TokenizerError(ValueError):
    """A tokenizer cannot be loaded; the message is one line, fit to show a user as is."""


def _metadata_of(source: Any) -> Mapping[str, Any]:
    """GGUF metadata as ``{key: python value}`` from our parsed dict or a ``gguf.GGUFReader``."""
    if isinstance(source, Mapping):
        return source
    fields = getattr(source, "fields", None)
    if isinstance(fields, Mapping):  # gguf.GGUFReader
        return {k: f.contents() for k, f in fields.items()}
    raise TypeError(f"expected GGUF metadata or a GGUFReader, got {type(source).__name__}")


def gguf_tokenizer_spec(metadata: Mapping[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(architecture, tokenizer_dict, tokenizer_kwargs)`` as transformers' ``get_gguf_tokenizer``
    would return them for this metadata: the builder input, and the kwargs of the wrapper class
    (special tokens, ``add_bos_token``/``add_eos_token``, ``chat_template``).
    """
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING

    architecture = metadata.get(Keys.General.ARCHITECTURE)
    if Keys.Tokenizer.LIST not in metadata:
        raise TokenizerError(
            f"the GGUF file ({architecture}) has no tokenizer ({Keys.Tokenizer.LIST})")
    grouped = {
        group: {
            name: metadata[f"tokenizer.{key}"]
            for key, name in renames.items()
            if f"tokenizer.{key}" in metadata
        }
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tok, kwargs = grouped["tokenizer"], grouped["tokenizer_config"]
    tok_type = tok.get("tokenizer_type")
    if tok_type == "llama":
        # llama.cpp adds BOS for a sentencepiece vocabulary unless the file says otherwise.
        kwargs.setdefault("add_bos_token", True)
    elif tok_type == "gemma4":
        kwargs["add_bos_token"] = False  # the chat template writes <bos> itself
    tokens = tok["tokens"]
    for name, key in _SPECIAL_TOKEN_KEYS.items():
        token_id = metadata.get(key)
        valid = isinstance(token_id, int) and 0 <= token_id < len(tokens)
        kwargs[name] = tokens[token_id] if valid else None
    return str(architecture), tok, kwargs


def _build(metadata: Mapping[str, Any]) -> tuple[PreTrainedTokenizerFast, dict[str, Any]]:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    architecture, tok_dict, kwargs = gguf_tokenizer_spec(metadata)
    try:
        backend, extra = convert_gguf_tokenizer(architecture, tok_dict)
    except (ValueError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TokenizerError(f"cannot build the tokenizer of this GGUF file: {msg}") from e
    kwargs.update(extra)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs), kwargs


def _cache_root() -> Path:
    from models.assets import cache_dir

    return cache_dir() / "tokenizers"


def _full_key(cache_key: str) -> str:
    import tokenizers
    import transformers

    ident = f"{cache_key}|{_BUILD_VERSION}|{transformers.__version__}|{tokenizers.__version__}"
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def tokenizer_from_gguf(
    source: Mapping[str, Any] | Any,
    *,
    cache_key: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> PreTrainedTokenizerFast:
    """A fast tokenizer from GGUF metadata (``models.gguf`` header metadata or a GGUFReader).

    Equal, id for id, to ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` (which needs
    torch); ``add_bos_token``/``add_eos_token``, the special tokens and ``chat_template`` come
    from the metadata. With ``cache_key`` (a hash that identifies the metadata, e.g.
    ``GGUFHeader.header_sha256``) the built tokenizer is stored under ``cache_dir`` (default
    ``<xlaserve cache>/tokenizers``) and reused on the next call with the same key. A cache that
    cannot be read or written is ignored (rebuilt / not stored), never an error.
    """
    metadata = _metadata_of(source)
    entry: Path | None = None
    if cache_key is not None:
        root = Path(cache_dir) if cache_dir is not None else _cache_root()
        entry = root / _full_key(cache_key)
        cached = _load_cached(entry)
        if cached is not None:
            return cached

    t0 = time.perf_counter()
    if progress:
        print("building tokenizer from GGUF metadata ...", file=sys.stderr, flush=True)
    tokenizer, kwargs = _build(metadata)
    if progress:
        print(f"built tokenizer in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    if entry is not None:
        _store(entry, tokenizer, kwargs)
    return tokenizer


def _load_cached(entry: Path) -> PreTrainedTokenizerFast | None:
    tok_file, kw_file = entry / "tokenizer.json", entry / "init_kwargs.json"
    if not (tok_file.is_file() and kw_file.is_file()):
        return None
    try:
        kwargs = json.loads(kw_file.read_text(encoding="utf-8"))
        return PreTrainedTokenizerFast(tokenizer_file=str(tok_file), **kwargs)
    except Exception:  # a damaged cache entry is rebuilt, never fatal
        return None


def _store(entry: Path, tokenizer: PreTrainedTokenizerFast, kwargs: dict[str, Any]) -> None:
    """Write the entry atomically: build it in a temporary sibling, then rename it into place."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".", dir=entry.parent))
        try:
            tokenizer.backend_tokenizer.save(str(tmp / "tokenizer.json"))
            (tmp / "init_kwargs.json").write_text(
                json.dumps(kwargs, ensure_ascii=False, sort_keys=True), encoding="utf-8"
            )
            os.replace(tmp, entry)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass  # read-only cache: keep working without it


def has_tokenizer_files(d: Path) -> bool:
    """Whether the directory ``d`` ships any of ``TOKENIZER_FILES``."""
    return any((d / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerFast:
    """The tokenizer of an HF model directory (``tokenizer.json`` + ``tokenizer_config.json``,
    or a BERT ``vocab.txt``).

    Never touches the network. The chat template comes from ``tokenizer_config.json``'s
    ``chat_template`` or from ``chat_template.jinja``, whichever transformers found, and is filled
    in here if it did not. Raises TokenizerError with a one-line message if there is no usable
    tokenizer.
    """
    from transformers import AutoTokenizer

    d = Path(path).expanduser()
    if not d.is_dir():
        raise TokenizerError(f"tokenizer directory not found: {d}")
    if not has_tokenizer_files(d):
        names = f"{', '.join(TOKENIZER_FILES[:-1])} or {TOKENIZER_FILES[-1]}"
        raise TokenizerError(f"no {names} in {d}")
    try:
        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TokenizerError(f"cannot load the tokenizer in {d}: {msg}") from e
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise TokenizerError(f"the tokenizer in {d} is not a fast (tokenizers) tokenizer")
    if not tok.chat_template:
        template = _chat_template_of(d)
        if template:
            tok.chat_template = template
    return tok


def _chat_template_of(d: Path) -> str | None:
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg = d / "tokenizer_config.json"
    if cfg.is_file():
        try:
            template = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError):
            return None
        if isinstance(template, str):
            return template
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            found = named.get("default") or next(iter(named.values()), None)
            return found if isinstance(found, str) else None
    return None
