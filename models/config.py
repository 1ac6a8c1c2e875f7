"""ModelConfig: the frozen, validated description of a decoder model, built from an HF config dict.

Callers: ``models.loader`` (from ``config.json`` or a GGUF's metadata mapped to the same keys) and
the tests (tiny random models). Families read only this object, never the raw dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str  # llama | mistral | qwen2 | qwen3 | gemma3_text
    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # qwen2: bias on q/k/v projections
    qk_norm: bool = False  # qwen3 / gemma3: RMSNorm on q and k per head
    hidden_act: str = "silu"
    # Gemma 3
    rope_local_base_freq: float | None = None
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = field(default_factory=tuple)  # per layer
    query_pre_attn_scalar: float | None = None
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.sliding_layers and len(self.sliding_layers) != self.num_layers:
            raise ValueError("sliding_layers must have one entry per layer")

    @property
    def is_gemma(self) -> bool:
        return self.model_type.startswith("gemma")

    @property
    def q_per_kv(self) -> int:  # G
        return self.num_heads // self.num_kv_heads

    @property
    def attn_scale(self) -> float:
        if self.query_pre_attn_scalar is not None:
            return float(self.query_pre_attn_scalar) ** -0.5
        return float(self.head_dim) ** -0.5

    def layer_window(self, i: int) -> int | None:
        if self.sliding_window and self.sliding_layers and self.sliding_layers[i]:
            return int(self.sliding_window)
        return None

    def layer_rope_theta(self, i: int) -> float:
        if self.rope_local_base_freq is not None and self.layer_window(i) is not None:
            return float(self.rope_local_base_freq)
        return float(self.rope_theta)

    def layer_rope_scaling(self, i: int) -> dict[str, Any] | None:
        # Gemma 3 applies rope scaling to global layers only; local layers use plain rope.
        return None if self.layer_window(i) is not None and self.is_gemma else self.rope_scaling

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        """Map a transformers ``config.json`` dict (text models; multimodal Gemma 3 nests it)."""
        if "text_config" in d and d.get("model_type") == "gemma3":
            d = {**d["text_config"], "model_type": "gemma3_text"}
        mt = d.get("model_type", "")
        if mt not in SUPPORTED_MODEL_TYPES:
            archs = d.get("architectures") or [mt]
            raise ValueError(
                f"unsupported architecture {archs[0]!r} (model_type {mt!r}); supported model "
                f"types: {', '.join(SUPPORTED_MODEL_TYPES)}")
        heads = int(d["num_attention_heads"])
        kv = int(d.get("num_key_value_heads") or heads)
        hidden = int(d["hidden_size"])
        head_dim = int(d.get("head_dim") or hidden // heads)
        rope_params = d.get("rope_parameters") or {}
        rope_theta = float(d.get("rope_theta") or rope_params.get("rope_theta")
                           or (1e6 if mt.startswith("gemma") else 10000.0))
        scaling = d.get("rope_scaling")
        if scaling is None and rope_params.get("rope_type") not in (None, "default"):
            scaling = rope_params
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
            scaling = None
        n_layers = int(d["num_hidden_layers"])
        sliding: tuple[bool, ...] = ()
        window = d.get("sliding_window")
        gemma = mt.startswith("gemma")
        if gemma:
            if d.get("layer_types"):
                sliding = tuple(t == "sliding_attention" for t in d["layer_types"])
            else:
                pattern = int(d.get("sliding_window_pattern") or 6)
                sliding = tuple((i + 1) % pattern != 0 for i in range(n_layers))
        elif window and d.get("use_sliding_window", mt == "mistral"):
            sliding = tuple(True for _ in range(n_layers))
        else:
            window = None
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        local_base = d.get("rope_local_base_freq")
        if gemma and local_base is None:
            local_base = 10000.0
        return cls(
            model_type="gemma3_text" if gemma else mt,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=n_layers,
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6 if gemma else 1e-5)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", gemma)),
            attention_bias=bool(d.get("attention_bias", mt == "qwen2")),
            qk_norm=gemma or mt == "qwen3",
            hidden_act=str(d.get("hidden_activation") or d.get("hidden_act")
                           or ("gelu_pytorch_tanh" if gemma else "silu")),
            rope_local_base_freq=float(local_base) if local_base is not None else None,
            sliding_window=int(window) if window else None,
            sliding_layers=sliding if window else (),
            query_pre_attn_scalar=(float(d["query_pre_attn_scalar"])
                                   if gemma and d.get("query_pre_attn_scalar") else None),
            final_logit_softcapping=d.get("final_logit_softcapping"),
            attn_logit_softcapping=d.get("attn_logit_softcapping"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )
