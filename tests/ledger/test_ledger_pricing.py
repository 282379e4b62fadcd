"""Pricing is pure: integer costs, per model, per token or per character."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from teeshard.ledger.pricing import ModelPrice, Pricing, PricingError, Usage


def test_per_token_prices_prompt_and_completion_separately_and_rounds_up_once() -> None:
    price = ModelPrice(prompt_per_1k=500, completion_per_1k=1500)
    assert price.cost(Usage(1000, 1000)) == 2000
    assert price.cost(Usage(1, 0)) == 1  # 0.5 rounds up: nothing is free
    assert price.cost(Usage(1, 1)) == 2  # 0.5 + 1.5 = 2 exactly, rounded once
    assert price.cost(Usage(0, 0)) == 0
    assert price.max_cost(10, 100) == price.cost(Usage(10, 100)) == 155


def test_cost_never_exceeds_the_reservation() -> None:
    price = ModelPrice(prompt_per_1k=7, completion_per_1k=13)
    for completion in range(0, 50):
        assert price.cost(Usage(33, completion)) <= price.max_cost(33, 50)


def test_per_character_is_the_original_scheme_bounded_for_reservation() -> None:
    price = ModelPrice(scheme="per_character", per_character=1, max_chars_per_token=8)
    assert price.max_cost(5, 10) == 80
    assert price.cost(Usage(5, 10, completion_chars=37)) == 37
    assert price.cost(Usage(5, 10, completion_chars=500)) == 80  # capped at the bound
    with pytest.raises(PricingError, match="character counts"):
        price.cost(Usage(5, 10))


def test_per_model_config_from_toml_and_json(tmp_path: Path) -> None:
    toml = tmp_path / "pricing.toml"
    toml.write_text(
        "default = { prompt_per_1k = 1000, completion_per_1k = 2000 }\n"
        '[models."tiny"]\nprompt_per_1k = 10\ncompletion_per_1k = 20\n'
        '[models."legacy"]\nscheme = "per_character"\nper_character = 1\n'
    )
    pricing = Pricing.load(toml)
    assert pricing.cost("tiny", Usage(1000, 1000)) == 30
    assert pricing.cost("other", Usage(1000, 1000)) == 3000
    assert pricing.for_model("legacy").scheme == "per_character"
    as_json = tmp_path / "pricing.json"
    as_json.write_text(json.dumps({"models": {"tiny": {"prompt_per_1k": 1}}}))
    assert Pricing.load(as_json).for_model("tiny").prompt_per_1k == 1


@pytest.mark.parametrize(
    "data, message",
    [
        ({"models": {"m": {"prompt_per_1k": -1}}}, "non-negative integer"),
        ({"models": {"m": {"prompt_per_1k": 1.5}}}, "non-negative integer"),
        ({"models": {"m": {"colour": 1}}}, "unknown keys colour"),
        ({"default": {"scheme": "per_word"}}, "unknown pricing scheme"),
        ({"currency": "EUR"}, "unknown pricing keys"),
    ],
)
def test_bad_configs_are_refused_clearly(data: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(PricingError, match=message):
        Pricing.from_mapping(data)


def test_bad_counts_are_refused() -> None:
    with pytest.raises(PricingError):
        ModelPrice().cost(Usage(-1, 0))
