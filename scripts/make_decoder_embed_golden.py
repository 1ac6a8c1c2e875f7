"""Golden embeddings of a decoder model (SmolLM2-135M-Instruct), from transformers + torch.

Run with the torch + transformers reference venv (not the project venv):

    /work/main/.venv-ref/bin/python scripts/make_decoder_embed_golden.py

The model is the GGUF asset xlaserve serves by default, turned into a transformers model the way
``scripts/make_golden.py`` does it (``from_pretrained(dir, gguf_file=...)``, dequantized to
float32). Its ``LlamaModel`` (``model.model``: the decoder without the LM head) runs each
sentence alone (batch of one, no padding, causal attention); ``last_hidden_state`` is the output
of the final RMSNorm. Written under tests/golden/pooling/:

- ``smollm2_embed.npz``: ``embeddings`` f32[8, 576]: the last token's final hidden state,
  L2-normalised (vLLM's default for a decoder served with ``--task embed``: LAST pooling,
  normalize); ``last_unnormalized`` the same before normalisation; ``mean_unnormalized`` the
  mean over the tokens; ``first_unnormalized`` the first token's state; ``hidden_{i}`` the
  per-token states ``[n_i, 576]`` of the sentences listed in ``hidden_of``;
- ``smollm2_embed.json``: sentences, their token ids (``tokenizer(text)``, the default
  ``add_special_tokens=True``), versions.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch
import transformers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_golden import _load  # noqa: E402  (the GGUF -> transformers loading of make_golden)

OUT = HERE.parent / "tests" / "golden" / "pooling"

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome",
    "Paris",
    "What is the capital of France?",
    "Ünïcödé têxt with àccents, emoji 🙂 and CJK 漢字 characters.",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    ("Continuous batching lets an inference server add new requests to a running batch as soon "
     "as earlier ones finish, instead of waiting for the whole batch to complete. Combined with "
     "a paged key-value cache, it keeps the accelerator busy and raises throughput."),
]
HIDDEN_OF = [0, 3]


@torch.no_grad()
def main() -> int:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    gguf, tok, causal_lm, load_s = _load("smollm2-135m-instruct")
    decoder = causal_lm.model  # LlamaModel: embeddings, layers, final norm; no LM head
    print(f"loaded {gguf.name} in {load_s:.1f} s ({type(decoder).__name__})", flush=True)
    ids_all: list[list[int]] = []
    last, mean, first = [], [], []
    arrays: dict[str, np.ndarray] = {}
    for i, text in enumerate(SENTENCES):
        ids = list(tok(text)["input_ids"])
        h = decoder(input_ids=torch.tensor([ids])).last_hidden_state[0]  # [n, D]
        last.append(h[-1].numpy())
        mean.append(h.mean(dim=0).numpy())
        first.append(h[0].numpy())
        if i in HIDDEN_OF:
            arrays[f"hidden_{i}"] = h.numpy().astype(np.float32)
        ids_all.append(ids)
    last_np = np.stack(last).astype(np.float32)
    emb = torch.nn.functional.normalize(torch.from_numpy(last_np), dim=-1).numpy()
    print(f"lengths {[len(x) for x in ids_all]}, |last| {np.linalg.norm(last_np, axis=1)}, "
          f"cos(0, 1) {float(emb[0] @ emb[1]):.4f}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT / "smollm2_embed.npz", embeddings=emb.astype(np.float32),
                        last_unnormalized=last_np,
                        mean_unnormalized=np.stack(mean).astype(np.float32),
                        first_unnormalized=np.stack(first).astype(np.float32), **arrays)
    meta = {
        "model": "smollm2-135m-instruct", "gguf_file": gguf.name,
        "reference": "transformers AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)"
                     ".model (LlamaModel), float32, CPU, one sentence per forward",
        "pooling": "LAST", "normalize": True, "hidden_of": HIDDEN_OF,
        "sentences": SENTENCES, "token_ids": ids_all,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "script": "scripts/make_decoder_embed_golden.py",
    }
    (OUT / "smollm2_embed.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False)
                                            + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
