"""``xlaserve-generate``: one chat prompt in, the model's answer out (no server).

    xlaserve-generate "What is the capital of France?"
    xlaserve-generate --model /path/to/model.gguf --max-tokens 64 "Write a haiku about the sea."

Errors a user can cause (a missing path, a corrupt GGUF, an unsupported architecture or
quantization) print one line to stderr and exit 1, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from models.registry import ModelLoadError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="xlaserve-generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt", help="the user message")
    ap.add_argument("--model", default=None,
                    help="HF directory, .gguf file, hub id or asset alias (default: SmolLM2)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--system", default=None, help="an optional system message")
    ap.add_argument("--cache-dir", default=None, help="asset/compile cache (XLASERVE_CACHE_DIR)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        from serving.engine.llm import LLM
        from serving.engine.sampling_params import SamplingParams
        llm = LLM(args.model, dtype=args.dtype, cache_dir=args.cache_dir,
                  max_model_len=2048, max_num_seqs=1, max_num_batched_tokens=64)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    tok = llm.tokenizer
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}]
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok.encode(text, add_special_tokens=False)
    else:  # a base model: plain continuation of the prompt
        ids = tok.encode(args.prompt)
    p = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    out = llm.generate([ids], p, use_tqdm=False)[0].outputs[0]
    print(out.text.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
