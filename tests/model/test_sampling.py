from __future__ import annotations

import pydantic
import pytest
import torch

from teeshard.model.sampling import (
    SamplingParams,
    TokenHistory,
    choice_seed,
    process_logits,
    sample,
    token_logprobs,
    uniform,
)

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


# -- logits processing (vLLM's order and semantics) ------------------------------------


def test_logit_bias_adds_to_the_named_tokens() -> None:
    out = process_logits(LOGITS, SamplingParams(logit_bias=((0, 5.0), (1, -100.0))))
    assert torch.allclose(out, LOGITS + torch.tensor([5.0, -100.0, 0, 0, 0]))
    assert sample(LOGITS, SamplingParams(logit_bias=((4, 10.0),)), 0, 0) == 4  # greedy too


def test_min_tokens_holds_back_eos_until_enough_tokens() -> None:
    params = SamplingParams(min_tokens=2, eos_token_ids=(1,))
    assert sample(LOGITS, params, 0, 0, TokenHistory()) == 2  # 1 is the argmax, held back
    assert sample(LOGITS, params, 0, 0, TokenHistory(output=[2])) == 2
    assert sample(LOGITS, params, 0, 0, TokenHistory(output=[2, 2])) == 1


def test_repetition_penalty_divides_positive_multiplies_negative_over_prompt_and_output() -> None:
    params = SamplingParams(repetition_penalty=2.0)
    out = process_logits(LOGITS, params, TokenHistory(prompt=[1], output=[3]))
    assert torch.allclose(out, torch.tensor([0.1, 1.0, 1.9, -2.0, 0.5]))


def test_frequency_and_presence_penalties_count_the_output_only() -> None:
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    out = process_logits(LOGITS, params, TokenHistory(prompt=[0], output=[1, 1, 4]))
    expected = LOGITS - torch.tensor([0.0, 2 * 0.5 + 0.25, 0.0, 0.0, 0.5 + 0.25])
    assert torch.allclose(out, expected)
    # the penalty turns greedy away from a token it repeated
    assert sample(LOGITS, params, 0, 0, TokenHistory(output=[1, 1, 4])) == 2


def test_penalties_without_history_change_nothing() -> None:
    params = SamplingParams(frequency_penalty=2.0, presence_penalty=2.0, repetition_penalty=2.0)
    assert torch.equal(process_logits(LOGITS, params, TokenHistory()), LOGITS)


def test_logprobs_are_the_raw_log_softmax_with_the_top_alternatives() -> None:
    raw = torch.log_softmax(LOGITS, dim=-1)
    got = token_logprobs(LOGITS, 3, 2)
    assert got.token == 3 and abs(got.logprob - float(raw[3])) < 1e-6
    assert [t for t, _ in got.top] == [1, 2]
    assert all(abs(v - float(raw[t])) < 1e-6 for t, v in got.top)
    assert token_logprobs(LOGITS, 0, 0).top == ()


def test_choice_seeds_are_distinct_reproducible_and_keep_choice_zero() -> None:
    seeds = [choice_seed(42, i) for i in range(16)]
    assert seeds[0] == 42 and len(set(seeds)) == 16
    assert seeds == [choice_seed(42, i) for i in range(16)]
    assert all(0 <= s < 2**63 for s in seeds)


def test_bad_bounds_are_refused() -> None:
    for bad in (
        {"presence_penalty": 2.5},
        {"frequency_penalty": -3.0},
        {"repetition_penalty": 0.0},
        {"logit_bias": ((1, 101.0),)},
        {"logit_bias": ((1, 1.0), (1, 2.0))},
        {"min_tokens": -1},
        {"logprobs": 21},
    ):
        with pytest.raises(pydantic.ValidationError):
            SamplingParams(**bad)  # type: ignore[arg-type]
