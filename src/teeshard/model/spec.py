"""Architecture spec: the subset of a Hugging Face ``config.json`` a shard needs.

One frozen dataclass for every supported family (Llama, Mistral, Qwen2). The
families differ only in a few switches (attention bias, sliding window, rope
scaling, tied embeddings), so one block implementation serves them all.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its options is not implemented."""


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    # llama3 scaling only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeSpec
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2)
    tie_word_embeddings: bool
    sliding_window: int | None  # Mistral; None means full attention
    torch_dtype: str  # dtype the checkpoint was saved in
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchSpec:
        fields = dict(data)
        fields["rope"] = RopeSpec(**fields["rope"])
        fields["eos_token_ids"] = tuple(fields["eos_token_ids"])
        return cls(**fields)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ArchSpec:
        model_type = config.get("model_type", "")
        if model_type not in SUPPORTED_FAMILIES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_FAMILIES)})"
            )
        if config.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {config['hidden_act']!r} is not supported")
        if config.get("mlp_bias", False):
            raise UnsupportedModelError("mlp_bias=true is not supported")
        num_heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        head_dim = config.get("head_dim") or hidden // num_heads
        eos = config.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        attention_bias = bool(config.get("attention_bias", model_type == "qwen2"))
        return cls(
            model_type=model_type,
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            rope=_rope_from_config(config),
            attention_bias=attention_bias,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            sliding_window=_sliding_window(config, model_type),
            torch_dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32"),
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ArchSpec:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not a Hugging Face checkpoint directory")
        return cls.from_hf_config(json.loads(path.read_text()))


def _rope_from_config(config: dict[str, Any]) -> RopeSpec:
    # transformers >= 5 writes "rope_parameters" (theta inside); older checkpoints
    # such as TinyLlama have a top-level "rope_theta" and an optional "rope_scaling".
    params = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    return RopeSpec(
        theta=theta,
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def _sliding_window(config: dict[str, Any], model_type: str) -> int | None:
    window = config.get("sliding_window")
    if window is None:
        return None
    if model_type == "qwen2" and not config.get("use_sliding_window", False):
        return None
    layer_types = config.get("layer_types")
    if layer_types and "sliding_attention" not in layer_types:
        return None
    if layer_types and any(t != "sliding_attention" for t in layer_types):
        raise UnsupportedModelError("mixed sliding/full attention layers are not supported")
    return int(window)
