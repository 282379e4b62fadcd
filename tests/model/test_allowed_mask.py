"""The allowed-token mask of grammar-constrained decoding: its wire form, its checks,
and that sampling never leaves it."""

from __future__ import annotations

import pytest
import torch

from teeshard.model.sampling import (
    SamplingParams,
    apply_allowed,
    mask_bytes,
    pack_allowed,
    sample,
    unpack_allowed,
)

VOCAB = 37  # not a multiple of 8: the last byte is partly outside the vocabulary


def test_pack_and_unpack_agree_bit_for_bit() -> None:
    ids = [0, 7, 8, 20, 36]
    mask = pack_allowed(ids, VOCAB)
    assert len(mask) == mask_bytes(VOCAB) == 5
    assert mask[0] == 0b1000_0001 and mask[1] == 0b0000_0001  # least significant bit first
    assert unpack_allowed(mask, VOCAB).nonzero().flatten().tolist() == ids


@pytest.mark.parametrize(
    ("mask", "reason"),
    [
        (b"\xff" * 4, "must have 5 bytes"),  # too short
        (b"\xff" * 6, "must have 5 bytes"),  # too long
        (bytes(5), "allows no token"),
        (bytes(4) + b"\x20", "past the vocabulary"),  # bit 37
    ],
)
def test_attack_malformed_masks_are_refused(mask: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        unpack_allowed(mask, VOCAB)


def test_sampling_never_leaves_the_mask() -> None:
    torch.manual_seed(0)
    logits = torch.randn(VOCAB) * 5
    allowed_ids = [3, 11, 29]
    allowed = unpack_allowed(pack_allowed(allowed_ids, VOCAB), VOCAB)
    greedy = sample(logits, SamplingParams(), 1, 0, allowed=allowed)
    assert greedy == max(allowed_ids, key=lambda t: float(logits[t]))
    params = SamplingParams(temperature=50.0, top_k=2)  # top-k among the allowed
    drawn = {
        sample(logits, params, seed, position, allowed=allowed)
        for seed in range(50)
        for position in range(4)
    }
    assert drawn <= set(allowed_ids) and len(drawn) >= 2
    assert sample(logits, SamplingParams(), 1, 0) == int(torch.argmax(logits))  # no mask


def test_a_mask_over_only_minus_infinity_still_samples_an_allowed_token() -> None:
    logits = torch.full((VOCAB,), float("-inf"))
    logits[5] = 1.0
    allowed = unpack_allowed(pack_allowed([9], VOCAB), VOCAB)
    assert torch.isfinite(apply_allowed(logits, allowed)).sum() == 1
    assert sample(logits, SamplingParams(temperature=1.0), 3, 0, allowed=allowed) == 9
