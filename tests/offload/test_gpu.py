"""The accelerator on CUDA: field products stay exact in float64 on the GPU (skips without one)."""

from __future__ import annotations

import pytest
import torch

from teeshard.model.layer_range import LayerRange
from teeshard.offload.apply import offload_shard
from teeshard.offload.modes import OffloadMode
from tests.checkpoints import TinyModel
from tests.offload.conftest import PROMPT, StartAccel, connect, greedy, load

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("mode", [OffloadMode.PLAIN, OffloadMode.BLINDED_VERIFIED])
def test_cuda_accelerator_matches_tee_only(
    start_accel: StartAccel, tiny_model: TinyModel, mode: OffloadMode
) -> None:
    reference, reference_logits = greedy(load(tiny_model.path), PROMPT, 16)
    accel = start_accel(
        tiny_model.path, LayerRange(0, tiny_model.num_layers), mode.arith, device="cuda"
    )
    client = connect(accel)
    assert client.info is not None and client.info.device.startswith("cuda")
    shard = load(tiny_model.path)
    handle = offload_shard(shard, mode, client)
    try:
        tokens, logits = greedy(shard, PROMPT, 16)
    finally:
        handle.close()
    assert tokens == reference
    assert float((logits - reference_logits).abs().max()) < 1e-3


def test_cuda_field_matmul_is_exact() -> None:
    from teeshard.offload import field as gf

    a = gf.random_elements((3, 9000))
    w = torch.randint(-gf.WEIGHT_MAX, gf.WEIGHT_MAX + 1, (9000, 7)).to(torch.float64)
    assert torch.equal(gf.matmul(a.cuda(), w.cuda()).cpu(), gf.matmul(a, w))
