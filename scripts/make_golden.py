"""Write the golden reference files that xlaserve's model tests compare against.

Dev tool, never a runtime dependency: it runs transformers + PyTorch (CPU, float32) from a separate
reference venv, because the project itself has no torch. See ``scripts/README.md``.

    /work/main/.venv-ref/bin/python scripts/make_golden.py            # models + tokenizers
    /work/main/.venv-ref/bin/python scripts/make_golden.py --only smollm2 --skip-tokenizer

For each model (SmolLM2-135M-Instruct and Gemma 3 270M, both loaded from the same GGUF files that
xlaserve loads, dequantized to float32 by transformers) it writes:

- ``tests/golden/<model>.npz``: per prompt ``i`` the prompt ids, the top-20 logits at every prompt
  position (full forward), 32 greedy tokens and the top-20 raw logits of every generation step
  (KV-cache decode path). The arrays are described in the manifest.
- ``tests/golden/<model>.json``: manifest (versions, prompts, dtype, array meanings, greedy texts).

and, from ``tests/data/tokenizer_corpus.json``, ``tests/golden/tokenizer_<model>.json`` with the
transformers tokenizer's ids (``add_special_tokens=True``) for every corpus string.

Self-checks (the script fails rather than write doubtful goldens): every greedy token is the argmax
of its own raw logits (no logits processor interfered), exactly 32 tokens come out (eos does not
stop generation), and the decode-path logits match a fresh full forward over prompt + generated
tokens (printed as max |delta|).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from models import assets  # noqa: E402  (needs the repo root on sys.path)

TOP_K = 20
NEW_TOKENS = 32
GOLDEN_DIR = REPO / "tests" / "golden"
CORPUS = REPO / "tests" / "data" / "tokenizer_corpus.json"

FRANCE = "What is the capital of France?"

PARAGRAPH = (
    "The lighthouse keeper climbed the spiral staircase every evening at dusk, carrying a small "
    "brass lantern and a notebook in which he recorded the weather, the ships that passed, and "
    "anything unusual he noticed on the water. Over thirty years he filled more than forty "
    "notebooks. When he finally retired, the town library asked to keep them, and historians "
    "later used his careful notes to reconstruct how the coastline had changed after the great "
    "storm of 1953."
)

# Gemma 3 uses a 512-token sliding window on 5 of every 6 layers; this prompt is long enough
# (> 600 tokens) that late positions attend to a window that excludes the start of the prompt.
LONG_TEXT = (
    "Chapter One. The river town of Aldermere had never been important, and its people were "
    "proud of that. It sat on a bend of the slow green river where the barges had once stopped "
    "to trade grain for salt, and where, for a few decades in the last century, a paper mill had "
    "filled the air with a sour smell that the older residents still claimed to miss. The mill "
    "closed, the barges stopped coming, and the town shrank to the size it seemed always to have "
    "wanted to be: three streets of stone houses, a bakery, a school with forty pupils, a church "
    "whose bell was rung by hand, and a library that opened on Tuesdays and Saturdays.\n\n"
    "The librarian was a woman named Margit Olsen, who had arrived in Aldermere at the age of "
    "twenty-six to spend one summer cataloguing a private collection that a retired judge had "
    "left to the town. She stayed for thirty-one years. The collection turned out to be larger "
    "and stranger than anyone had expected: maps of coastlines that did not match any known "
    "coast, ledgers written in a shorthand nobody could read, seed catalogues from nurseries "
    "that had closed a hundred years earlier, and a complete run of a scientific journal devoted "
    "entirely to the behaviour of bees in cold weather. Margit read all of it. She taught herself "
    "the shorthand from a manual she found inside the lining of a trunk, and discovered that the "
    "ledgers recorded, in obsessive detail, the daily temperature, rainfall, and wind direction "
    "in Aldermere from 1871 to 1924, along with notes on which flowers were blooming and which "
    "birds had been seen.\n\n"
    "Nobody paid much attention to this discovery until a group of climate researchers from the "
    "university in the capital came looking for long historical weather records. They had heard "
    "a rumour about the ledgers from a retired schoolteacher, and they arrived one wet Tuesday in "
    "October with laptops, cameras, and very low expectations. They left six hours later with "
    "photographs of every page and an invitation for Margit to visit the university and explain "
    "the shorthand. Two years after that, a paper appeared in an international journal comparing "
    "the Aldermere records with modern measurements. It showed that the first frost of autumn now "
    "arrived nineteen days later than it had in the 1870s, that the river froze in only four "
    "winters of the last forty, and that the swallows came back eleven days earlier each spring. "
    "The paper thanked the judge, the anonymous ledger keeper, and, in a footnote, Margit Olsen, "
    "whose patient work had made the analysis possible.\n\n"
    "The town was briefly famous. A television crew filmed the library and the bell tower; a "
    "travel magazine described Aldermere as a place where time had been written down. Tourists "
    "came for a season, bought bread at the bakery, took photographs of the river, and asked to "
    "see the ledgers, which by then had been moved to a climate-controlled archive in the "
    "capital. Margit answered their questions politely, showed them the photographs, and "
    "returned to her cataloguing. She had found, at the bottom of the last trunk, a bundle of "
    "letters tied with a faded blue ribbon, and she suspected that they would explain who the "
    "ledger keeper had been and why the judge had kept the ledgers hidden for so long. She untied "
    "the ribbon carefully, unfolded the first letter, and began to read. The handwriting was "
    "small and neat, and the first line said"
)

PROMPTS: dict[str, list[dict[str, Any]]] = {
    "smollm2": [
        {"kind": "chat", "messages": [{"role": "user", "content": FRANCE}]},
        {"kind": "text", "text": "The capital of France is"},
        {"kind": "text", "text": "def fibonacci(n):"},
        {"kind": "text", "text": PARAGRAPH},
    ],
    "gemma3": [
        {"kind": "text", "text": "The capital of France is"},
        {"kind": "text", "text": "def fibonacci(n):"},
        {"kind": "text", "text": PARAGRAPH},
        {"kind": "text", "text": LONG_TEXT},
    ],
}

MODELS = {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma3-270m"}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _load(alias: str) -> tuple[Path, Any, Any, float]:
    gguf = assets.fetch(alias)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    model.eval()
    # The GGUF loader leaves oddly aligned tensors that run several times slower; fresh copies
    # have the same values (model_assets.md 2d).
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    return gguf, tok, model, time.perf_counter() - t0


def _prompt_ids(tok: Any, prompt: dict[str, Any]) -> tuple[list[int], str]:
    """Token ids and the text they came from (the chat render for chat prompts)."""
    if prompt["kind"] == "chat":
        text = tok.apply_chat_template(
            prompt["messages"], add_generation_prompt=True, tokenize=False
        )
        # The rendered template already holds its special tokens; encode it verbatim.
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return list(ids), text
    return list(tok(prompt["text"])["input_ids"]), prompt["text"]


def _topk(logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    vals, idx = torch.topk(logits.float(), TOP_K, dim=-1, sorted=True)
    return vals.numpy().astype(np.float32), idx.numpy().astype(np.int32)


@torch.no_grad()
def make_model_golden(name: str) -> None:
    alias = MODELS[name]
    gguf, tok, model, load_s = _load(alias)
    print(f"[{name}] loaded {gguf.name} in {load_s:.1f} s", flush=True)
    arrays: dict[str, np.ndarray] = {}
    manifest_prompts: list[dict[str, Any]] = []
    max_decode_delta = 0.0
    for i, prompt in enumerate(PROMPTS[name]):
        t0 = time.perf_counter()
        ids, text = _prompt_ids(tok, prompt)
        input_ids = torch.tensor([ids], dtype=torch.long)
        logits = model(input_ids=input_ids).logits[0]  # [T, V]
        vals, idx = _topk(logits)
        last_prefill = logits[-1].clone()
        del logits
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=0,
            repetition_penalty=1.0,
            eos_token_id=None,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        gen = out.sequences[0, len(ids) :]
        if gen.shape[0] != NEW_TOKENS:
            raise RuntimeError(f"{name} prompt {i}: generate gave {gen.shape[0]} tokens")
        step_logits = torch.stack([s[0] for s in out.logits])  # [32, V] raw, before processors
        if not torch.equal(step_logits.argmax(-1), gen):
            raise RuntimeError(f"{name} prompt {i}: a greedy token is not its logits' argmax")
        # Reference self-check: the cached decode logits must match a fresh full forward.
        full = model(input_ids=out.sequences[:, :-1]).logits[0, len(ids) - 1 :]
        delta = float((full - step_logits).abs().max())
        delta_prefill = float((last_prefill - step_logits[0]).abs().max())
        max_decode_delta = max(max_decode_delta, delta, delta_prefill)
        del full
        gvals, gidx = _topk(step_logits)
        top2 = torch.topk(step_logits, 2, dim=-1).values
        margin = float((top2[:, 0] - top2[:, 1]).min())
        arrays[f"p{i}_prompt_ids"] = np.asarray(ids, dtype=np.int32)
        arrays[f"p{i}_top_values"] = vals
        arrays[f"p{i}_top_ids"] = idx
        arrays[f"p{i}_greedy_ids"] = gen.numpy().astype(np.int32)
        arrays[f"p{i}_greedy_top_values"] = gvals
        arrays[f"p{i}_greedy_top_ids"] = gidx
        greedy_text = tok.decode(gen.tolist(), skip_special_tokens=False)
        entry: dict[str, Any] = dict(prompt)
        entry.update(
            index=i,
            num_prompt_tokens=len(ids),
            greedy_text=greedy_text,
            greedy_min_top1_top2_margin=margin,
            decode_vs_full_forward_max_abs_delta=max(delta, delta_prefill),
        )
        if prompt["kind"] == "chat":
            entry["chat_render"] = text
        manifest_prompts.append(entry)
        print(
            f"[{name}] p{i}: {len(ids)} tokens, {time.perf_counter() - t0:.1f} s, "
            f"decode-vs-full {max(delta, delta_prefill):.2e}, min margin {margin:.3f}, "
            f"greedy {greedy_text!r}",
            flush=True,
        )

    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(GOLDEN_DIR / f"{name}.npz", allow_pickle=False, **arrays)
    cfg = model.config
    manifest = {
        "model": name,
        "asset": alias,
        "gguf_file": gguf.name,
        "gguf_sha256": _sha256(gguf),
        "reference": "transformers AutoModelForCausalLM.from_pretrained(dir, gguf_file=...) on CPU",
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "dtype": "float32",
        "torch_num_threads": torch.get_num_threads(),
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "config": {
            k: getattr(cfg, k)
            for k in (
                "model_type",
                "num_hidden_layers",
                "hidden_size",
                "intermediate_size",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "vocab_size",
                "rms_norm_eps",
                "sliding_window",
                "layer_types",
                "query_pre_attn_scalar",
                "tie_word_embeddings",
            )
            if hasattr(cfg, k)
        },
        "top_k": TOP_K,
        "new_tokens": NEW_TOKENS,
        "generation": (
            "model.generate(do_sample=False, max_new_tokens=32, eos_token_id=None, "
            "repetition_penalty=1.0): plain argmax; eos does not stop generation, so "
            "compare with ignore_eos"
        ),
        "tokenization": (
            "text prompts: tokenizer(text) with its default add_special_tokens=True; chat "
            "prompts: apply_chat_template(messages, add_generation_prompt=True, tokenize=False) "
            "then tokenizer(render, add_special_tokens=False)"
        ),
        "arrays": {
            "p{i}_prompt_ids": "int32 [T]: prompt token ids",
            "p{i}_top_values": "float32 [T, 20]: top-20 logits at every prompt position "
            "(one full forward over the prompt), sorted descending",
            "p{i}_top_ids": "int32 [T, 20]: the vocab ids of p{i}_top_values",
            "p{i}_greedy_ids": "int32 [32]: greedy continuation",
            "p{i}_greedy_top_values": "float32 [32, 20]: top-20 raw logits of each generation "
            "step (KV-cache decode; row 0 = last prompt position); "
            "row j's argmax is greedy_ids[j]",
            "p{i}_greedy_top_ids": "int32 [32, 20]: the vocab ids of p{i}_greedy_top_values",
        },
        "notes": (
            "Near-ties make top-20 id order fragile: compare by gathering your logits at the "
            "reference ids. greedy_min_top1_top2_margin tells how robust each greedy run is."
        ),
        "max_decode_vs_full_forward_abs_delta": max_decode_delta,
        "prompts": manifest_prompts,
    }
    (GOLDEN_DIR / f"{name}.json").write_text(
        json.dumps(manifest, indent=1, ensure_ascii=False) + "\n"
    )
    del model


def make_tokenizer_golden(name: str) -> None:
    data = CORPUS.read_bytes()
    corpus = json.loads(data)
    if not (isinstance(corpus, list) and all(isinstance(s, str) for s in corpus)):
        raise RuntimeError(f"{CORPUS} is not a JSON list of strings")
    gguf = assets.fetch(MODELS[name])
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = [list(tok(s, add_special_tokens=True)["input_ids"]) for s in corpus]
    out = {
        "corpus_sha256": hashlib.sha256(data).hexdigest(),
        "tokenizer": f"transformers {transformers.__version__} AutoTokenizer.from_pretrained("
        f"gguf_file={gguf.name!r}) ({type(tok).__name__})",
        "add_special_tokens": True,
        "ids": ids,
    }
    path = GOLDEN_DIR / f"tokenizer_{name}.json"
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print(
        f"[{name}] tokenizer golden: {len(ids)} strings, {sum(map(len, ids))} ids, "
        f"{time.perf_counter() - t0:.1f} s",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=sorted(MODELS), action="append")
    ap.add_argument("--skip-models", action="store_true")
    ap.add_argument("--skip-tokenizer", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    for name in args.only or sorted(MODELS, reverse=True):  # smollm2 first: smaller
        if not args.skip_models:
            make_model_golden(name)
        if not args.skip_tokenizer:
            make_tokenizer_golden(name)
    print(f"total {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
