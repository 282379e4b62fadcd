from __future__ import annotations

import torch

from teeshard.model.sampling import SamplingParams, new_generator, sample

LOGITS = torch.tensor([0.1, 2.0, 1.9, -1.0, 0.5])


def draws(params: SamplingParams, n: int = 400) -> list[int]:
    generator = new_generator(params)
    return [sample(LOGITS, params, generator) for _ in range(n)]


def test_greedy_is_argmax() -> None:
    assert sample(LOGITS, SamplingParams(), new_generator(SamplingParams())) == 1


def test_seed_makes_sampling_reproducible() -> None:
    params = SamplingParams(temperature=1.0, seed=11)
    assert draws(params) == draws(params)
    assert draws(params) != draws(SamplingParams(temperature=1.0, seed=12))


def test_top_k_keeps_only_the_k_best() -> None:
    assert set(draws(SamplingParams(temperature=5.0, top_k=2, seed=1))) == {1, 2}


def test_top_p_keeps_the_smallest_nucleus() -> None:
    # probabilities ~ [.07,.45,.40,.02,.10]: top_p=0.5 keeps tokens 1 and 2 only
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.5, seed=3))) == {1, 2}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.01, seed=3))) == {1}


def test_temperature_spreads_choices() -> None:
    assert len(set(draws(SamplingParams(temperature=2.0, seed=5)))) == 5
