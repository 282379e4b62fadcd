from __future__ import annotations

import torch

from teeshard.model.sampling import SamplingParams, sample, uniform

LOGITS = torch.tensor([0.1, 2.0, 1.9, -1.0, 0.5])


def draws(params: SamplingParams, n: int = 400) -> list[int]:
    seed = params.seed if params.seed is not None else 0
    return [sample(LOGITS, params, seed, position) for position in range(n)]


def test_greedy_is_argmax() -> None:
    assert sample(LOGITS, SamplingParams(), 0, 0) == 1


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


def test_a_draw_depends_on_seed_and_position_only() -> None:
    """What failover needs: the draw at a position is the same whatever came before."""
    params = SamplingParams(temperature=1.0, seed=7)
    assert [sample(LOGITS, params, 7, p) for p in (10, 11, 12)] == draws(params, 13)[10:]
    values = [uniform(7, p) for p in range(2000)]
    assert all(0.0 <= v < 1.0 for v in values) and len(set(values)) == len(values)
    assert abs(sum(values) / len(values) - 0.5) < 0.03  # roughly uniform


def test_sampled_frequencies_follow_the_distribution() -> None:
    params = SamplingParams(temperature=1.0, seed=3)
    counts = torch.bincount(torch.tensor(draws(params, 4000)), minlength=5).double() / 4000
    expected = torch.softmax(LOGITS.double(), dim=-1)
    assert (counts - expected).abs().max() < 0.03
