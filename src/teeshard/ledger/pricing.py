"""Pricing: what a request costs, in the ledger's smallest unit. Pure; no I/O but loading.

Two schemes:

- ``per_token`` (the default): an integer price per 1000 prompt tokens and per
  1000 completion tokens, per model. A request's cost is
  ``ceil((prompt * prompt_per_1k + completion * completion_per_1k) / 1000)``;
  rounding up once over the whole request means nothing is free and nothing is
  charged twice for rounding.
- ``per_character``: the original system's pricing, an integer price per
  character of the completion text (and optionally of the prompt). Characters
  are only known after decoding, so the most a request can cost needs a bound
  on characters per token (``max_chars_per_token``); the charge never exceeds
  that bound.

Configuration is TOML (or JSON with the same shape)::

    default = { prompt_per_1k = 1000, completion_per_1k = 2000 }
    [models."tiny-llama"]
    prompt_per_1k = 500
    completion_per_1k = 1500
    [models."legacy"]
    scheme = "per_character"
    per_character = 1
    max_chars_per_token = 32

A model with no entry of its own uses ``default``.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Scheme = Literal["per_token", "per_character"]


class PricingError(ValueError):
    """A pricing configuration or a usage it cannot price."""


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    prompt_chars: int | None = None  # needed by per-character pricing
    completion_chars: int | None = None


@dataclass(frozen=True)
class ModelPrice:
    scheme: Scheme = "per_token"
    prompt_per_1k: int = 1000  # units per 1000 prompt tokens
    completion_per_1k: int = 1000  # units per 1000 completion tokens
    per_character: int = 1  # units per completion character (per_character scheme)
    prompt_per_character: int = 0  # units per prompt character (per_character scheme)
    max_chars_per_token: int = 32  # bound used for the most a request can cost

    def __post_init__(self) -> None:
        if self.scheme not in ("per_token", "per_character"):
            raise PricingError(f"unknown pricing scheme {self.scheme!r}")
        for name in (
            "prompt_per_1k",
            "completion_per_1k",
            "per_character",
            "prompt_per_character",
            "max_chars_per_token",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PricingError(f"{name} must be a non-negative integer, got {value!r}")
        if self.max_chars_per_token == 0:
            raise PricingError("max_chars_per_token must be at least 1")

    def cost(self, usage: Usage) -> int:
        _check_counts(usage.prompt_tokens, usage.completion_tokens)
        if self.scheme == "per_token":
            units = (
                usage.prompt_tokens * self.prompt_per_1k
                + usage.completion_tokens * self.completion_per_1k
            )
            return -(-units // 1000)  # ceiling division on integers
        if usage.completion_chars is None or (
            self.prompt_per_character and usage.prompt_chars is None
        ):
            raise PricingError(
                "per-character pricing needs the character counts of the completion "
                "(and of the prompt when prompt_per_character is set)"
            )
        prompt_chars = usage.prompt_chars or 0
        return min(
            usage.completion_chars * self.per_character + prompt_chars * self.prompt_per_character,
            self.max_cost(usage.prompt_tokens, usage.completion_tokens, prompt_chars),
        )

    def max_cost(
        self, prompt_tokens: int, max_completion_tokens: int, prompt_chars: int | None = None
    ) -> int:
        """The most a request can cost: what is reserved before generating."""
        _check_counts(prompt_tokens, max_completion_tokens)
        if self.scheme == "per_token":
            return self.cost(Usage(prompt_tokens, max_completion_tokens))
        prompt_bound = (
            prompt_chars if prompt_chars is not None else prompt_tokens * self.max_chars_per_token
        )
        return (
            max_completion_tokens * self.max_chars_per_token * self.per_character
            + prompt_bound * self.prompt_per_character
        )


@dataclass(frozen=True)
class Pricing:
    default: ModelPrice = field(default_factory=ModelPrice)
    models: Mapping[str, ModelPrice] = field(default_factory=dict)

    def for_model(self, model: str) -> ModelPrice:
        return self.models.get(model, self.default)

    def cost(self, model: str, usage: Usage) -> int:
        return self.for_model(model).cost(usage)

    def max_cost(self, model: str, prompt_tokens: int, max_completion_tokens: int) -> int:
        return self.for_model(model).max_cost(prompt_tokens, max_completion_tokens)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Pricing:
        unknown = set(data) - {"default", "models"}
        if unknown:
            raise PricingError(f"unknown pricing keys: {', '.join(sorted(unknown))}")
        default = _model_price(data.get("default", {}), "default")
        models_raw = data.get("models", {})
        if not isinstance(models_raw, Mapping):
            raise PricingError("'models' must be a table of model name -> prices")
        models = {name: _model_price(v, f"models.{name}") for name, v in models_raw.items()}
        return cls(default, models)

    @classmethod
    def load(cls, path: str | Path) -> Pricing:
        """Read a TOML (``.toml``) or JSON (any other suffix) pricing file."""
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise FileNotFoundError(f"pricing file {path} does not exist") from None
        try:
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise PricingError(f"pricing file {path} is not valid: {exc}") from None
        return cls.from_mapping(data)


def _model_price(raw: object, where: str) -> ModelPrice:
    if not isinstance(raw, Mapping):
        raise PricingError(f"{where} must be a table of prices")
    allowed = set(ModelPrice.__dataclass_fields__)
    unknown = set(raw) - allowed
    if unknown:
        raise PricingError(
            f"{where}: unknown keys {', '.join(sorted(unknown))} (allowed: {', '.join(sorted(allowed))})"
        )
    try:
        return ModelPrice(**raw)
    except PricingError as exc:
        raise PricingError(f"{where}: {exc}") from None


def _check_counts(*counts: int) -> None:
    for count in counts:
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise PricingError(f"token counts must be non-negative integers, got {count!r}")
