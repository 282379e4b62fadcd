"""A malicious accelerator process: caught every time in verified modes, never used again.

The attacks: flip one element of a product, return the answer to the previous
request (stale), return another matrix's product. Without verification the
blinded mode is fooled silently (the attack succeeds); with it, each of many
trials fails with a clear error and the node stops sending to that accelerator.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from teeshard.model.layer_range import LayerRange
from teeshard.offload.apply import offload_shard
from teeshard.offload.errors import AcceleratorMisbehaved
from teeshard.offload.modes import OffloadMode
from tests.checkpoints import TinyModel
from tests.offload.conftest import PROMPT, StartAccel, connect, greedy, load

TRIALS = 40
MALICIOUS = "tests.offload.malicious_accel"


def tampering(start_accel: StartAccel, model: TinyModel, tamper: str):  # type: ignore[no-untyped-def]
    return start_accel(
        model.path,
        LayerRange(0, model.num_layers),
        "field",
        module=MALICIOUS,
        extra=("--tamper", tamper),
    )


def test_unverified_blinding_is_fooled_by_a_flip(
    start_accel: StartAccel, tiny_llama: TinyModel
) -> None:
    """The attack works where nothing checks: the reason verified modes exist."""
    _reference, reference_logits = greedy(load(tiny_llama.path), PROMPT, 4)
    shard = load(tiny_llama.path)
    handle = offload_shard(
        shard, OffloadMode.BLINDED, connect(tampering(start_accel, tiny_llama, "flip"))
    )
    try:
        _, logits = greedy(shard, PROMPT, 4)  # no error raised
    finally:
        handle.close()
    assert float((logits - reference_logits).abs().max()) > 1e-3


@pytest.mark.parametrize("tamper", ["flip", "stale", "swap"])
@pytest.mark.parametrize("mode", [OffloadMode.VERIFIED, OffloadMode.BLINDED_VERIFIED])
def test_tampering_is_caught_every_time(
    start_accel: StartAccel, tiny_llama: TinyModel, tamper: str, mode: OffloadMode
) -> None:
    accel = tampering(start_accel, tiny_llama, tamper)
    shard = load(tiny_llama.path)
    client = connect(accel)
    handle = offload_shard(shard, mode, client)
    group = "1.attn_out"  # shares its shape with 0/2/3.attn_out: a swap is possible
    runner = handle.runners[group]
    try:
        if tamper == "stale":  # a first answer to go stale (honest unless the server is reused)
            with contextlib.suppress(AcceleratorMisbehaved):
                runner.product(torch.randn(2, 64))
        for trial in range(TRIALS):
            client.distrusted = None  # a fresh start per trial (the node never does this)
            x = torch.randn(2 if tamper == "stale" else 1 + trial % 3, 64)
            with pytest.raises(AcceleratorMisbehaved, match="Freivalds check failed"):
                runner.product(x)
        # the node stops using that accelerator: the next step fails before sending
        sent = client.traffic.requests
        with pytest.raises(AcceleratorMisbehaved, match="refusing to use it again"):
            greedy(shard, PROMPT, 2)
        assert client.traffic.requests == sent
    finally:
        handle.close()


def test_two_server_checks_server_b(start_accel: StartAccel, tiny_llama: TinyModel) -> None:
    layers = LayerRange(0, tiny_llama.num_layers)
    honest = connect(start_accel(tiny_llama.path, layers, "field"))
    liar = connect(tampering(start_accel, tiny_llama, "flip"))
    shard = load(tiny_llama.path)
    handle = offload_shard(shard, OffloadMode.BLINDED_VERIFIED, honest, second=liar)
    try:
        with pytest.raises(AcceleratorMisbehaved, match="wrong pad product"):
            greedy(shard, PROMPT, 2)
        assert liar.distrusted is not None and honest.distrusted is None
    finally:
        handle.close()
