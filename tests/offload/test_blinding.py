"""What the accelerator sees in blinded mode: uniform residues, independent of the input,
and a pad never used twice over a long generation and across sessions."""

from __future__ import annotations

import hashlib

import torch

from teeshard.model.layer_range import LayerRange
from teeshard.offload import field as gf
from teeshard.offload import messages as wire
from teeshard.offload.apply import OffloadOptions, offload_shard
from teeshard.offload.modes import OffloadMode
from teeshard.offload.quant import quantize_activation
from tests.checkpoints import TinyModel
from tests.offload.conftest import PROMPT, StartAccel, connect, greedy, load


def uploads(frames: list[bytes]) -> list[torch.Tensor]:
    out = []
    for frame in frames:
        message = wire.decode_request(frame)
        if isinstance(message, wire.MatmulRequest):
            out.append(wire.from_wire(message.x, 2))
    return out


def chi_square_uniform(values: torch.Tensor, buckets: int = 64) -> float:
    counts = torch.bincount((values >> 55).reshape(-1), minlength=buckets).double()  # top 6 bits
    expected = values.numel() / buckets
    return float(((counts - expected) ** 2 / expected).sum())


def test_same_activation_looks_different_and_uniform(
    start_accel: StartAccel, tiny_llama: TinyModel
) -> None:
    frames: list[bytes] = []
    client = connect(
        start_accel(tiny_llama.path, LayerRange(0, 4), "field"), observer=frames.append
    )
    handle = offload_shard(load(tiny_llama.path), OffloadMode.BLINDED_VERIFIED, client)
    runner = handle.runners["0.mlp_out"]  # K = 160
    try:
        x = torch.randn(4, 160)
        first, second = runner.product(x), runner.product(x)
        assert torch.equal(first, second)  # same answer ...
        zero = runner.product(torch.zeros(64, 160))  # all-zero input: u is the pad itself
        huge = runner.product(torch.full((64, 160), 1e4))  # every entry at its bound
        noisy = torch.randn(64, 160) * torch.logspace(-2, 2, 160)  # a wide spread of values
        runner.product(noisy)
        assert float(zero.abs().max()) == 0.0 and huge.shape == (64, 64)
        assert runner.scales is not None
        xq = quantize_activation(noisy, runner.scales.act_bound).q
    finally:
        handle.close()
    seen = uploads(frames)
    u1, u2, u_zero, u_huge, u_noisy = seen[-5:]
    assert not bool((u1 == u2).any())  # ... from uploads that share no element
    # Top bits of what leaves the TEE are uniform whatever the input (chi-square, 63 d.o.f.:
    # 130 is far in the tail, p < 1e-6) ...
    for u in (u_zero, u_huge, u_noisy, torch.cat([u1, u2])):
        assert chi_square_uniform(u) < 130
    # ... and uncorrelated with it (10240 samples: |r| < 0.05 is > 5 sigma)
    assert abs(correlation(xq, u_noisy)) < 0.05
    # the same statistics on the unblinded residues (verified mode) fail: the test can fail
    assert chi_square_uniform(gf.to_field(xq)) > 1000
    assert abs(correlation(xq, gf.to_field(xq))) > 0.2


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    pair = torch.stack([a.reshape(-1).double(), b.reshape(-1).double()])
    return float(torch.corrcoef(pair)[0, 1])


def test_no_pad_is_reused_over_a_long_generation_and_sessions(
    start_accel: StartAccel, tiny_llama: TinyModel
) -> None:
    pads: list[bytes] = []
    frames: list[bytes] = []

    def record(group: str, r: torch.Tensor) -> None:
        pads.extend(hashlib.sha256(row.numpy().tobytes()).digest() for row in r)

    client = connect(
        start_accel(tiny_llama.path, LayerRange(0, 4), "field"), observer=frames.append
    )
    shard = load(tiny_llama.path)
    options = OffloadOptions(pool_rows=8, chunk_rows=3, pad_observer=record)
    handle = offload_shard(shard, OffloadMode.BLINDED, client, options=options)
    try:
        first, _ = greedy(shard, PROMPT, 48)  # session 1 (its own KV cache)
        second, _ = greedy(shard, PROMPT, 48)  # session 2, same prompt
    finally:
        handle.close()
    assert first == second
    # one pad per row per group: 16 layer groups see every position, the LM head the last
    per_session = 4 * 4 * (len(PROMPT) + 48) + (1 + 48)
    assert len(pads) == 2 * per_session
    assert len(set(pads)) == len(pads)
    sent_rows = [row.numpy().tobytes() for u in uploads(frames) for row in u]
    assert len(set(sent_rows)) == len(sent_rows)  # same prompt twice, yet no upload repeats
    stats = handle.pad_stats
    assert stats is not None and stats.rows_used == len(pads)
