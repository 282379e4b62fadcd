"""Freivalds' check against secret vectors: every wrong product caught, right ones pass."""

from __future__ import annotations

import random

import torch

from teeshard.offload import field as gf
from teeshard.offload.freivalds import FreivaldsKey
from teeshard.offload.quant import quantize_weight

TRIALS = 500


def setup() -> tuple[FreivaldsKey, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    weight = quantize_weight(torch.randn(48, 96))
    other = quantize_weight(torch.randn(48, 96))
    return FreivaldsKey.derive(weight), weight.q_t, other.q_t, gf.random_elements((4, 96))


def test_honest_products_pass() -> None:
    key, w, _, _ = setup()
    for _ in range(20):
        u = gf.random_elements((3, 96))
        assert key.holds(u, gf.matmul(u, w))


def test_one_flipped_element_is_caught_every_time() -> None:
    key, w, _, u = setup()
    honest = gf.matmul(u, w)
    for _ in range(TRIALS):
        bad = honest.clone()
        row, col = random.randrange(bad.shape[0]), random.randrange(bad.shape[1])
        bad[row, col] = (bad[row, col] + random.randrange(1, gf.P)) % gf.P
        assert not key.holds(u, bad)
    # the smallest possible change, +1 in one place
    bad = honest.clone()
    bad[0, 0] = (bad[0, 0] + 1) % gf.P
    assert not key.holds(u, bad)


def test_stale_and_other_matrix_products_are_caught() -> None:
    key, w, other, _ = setup()
    previous = gf.random_elements((4, 96))
    for _ in range(TRIALS // 5):
        u = gf.random_elements((4, 96))
        assert not key.holds(u, gf.matmul(previous, w))  # the answer to an earlier input
        assert not key.holds(u, gf.matmul(u, other))  # another matrix's product
        previous = u


def test_two_keys_for_one_matrix_differ() -> None:
    weight = quantize_weight(torch.randn(8, 8))
    assert not torch.equal(FreivaldsKey.derive(weight).s, FreivaldsKey.derive(weight).s)
