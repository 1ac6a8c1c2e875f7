"""Tiny real models for fast tests: prime-ish dimensions, random weights, a byte-level tokenizer.

Not mocks: the tiny model runs the same family code, and the tokenizer is a real ``tokenizers``
byte-level model, just with a 256-byte vocabulary (+ special tokens) instead of learned merges.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from models.config import ModelConfig
from models.registry import LoadedModel, random_model

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_config(model_type: str = "llama", **kw: Any) -> ModelConfig:
    base: dict[str, Any] = dict(
        model_type=model_type, vocab_size=259, hidden_size=56, intermediate_size=92,
        num_layers=3, num_heads=6, num_kv_heads=2, head_dim=14, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=257, eos_token_ids=(258,))
    if model_type == "gemma3_text":
        base.update(qk_norm=True, hidden_act="gelu_pytorch_tanh", rope_local_base_freq=10000.0,
                    rope_theta=1e6, sliding_window=24, sliding_layers=(True, True, False),
                    query_pre_attn_scalar=14.0)
    base.update(kw)
    return ModelConfig(**base)


def byte_tokenizer() -> Any:
    """ids 0..255 are bytes; 256.. are the special tokens (eos 258 = <|im_end|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_unicode = sorted(alphabet, key=lambda c: _unicode_to_byte(c))
    vocab = {ch: i for i, ch in enumerate(byte_to_unicode)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>", chat_template=CHATML)


def _unicode_to_byte(ch: str) -> int:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip([chr(c) for c in cs], bs, strict=True))[ch]


def tiny_loaded(model_type: str = "llama", dtype: Any = jnp.float32, seed: int = 0,
                attn_fn: Any = None, write_fn: Any = None, **kw: Any) -> LoadedModel[ModelConfig]:
    from ops import attention
    cfg = tiny_config(model_type, **kw)
    model = random_model(cfg, dtype, attn_fn or attention.ragged_paged_attention_reference,
                         write_fn or attention.write_kv, seed=seed)
    return LoadedModel(cfg, model, byte_tokenizer(), {"eos_token_id": 258}, f"tiny-{model_type}",
                       "random", dtype, cfg.max_position_embeddings)
