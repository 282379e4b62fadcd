"""teeshard's AVX2 bfloat16 kernel, for CPUs without BF16 instructions: exact enough,
batch-invariant bit for bit, strict about its arguments, and a bfloat16 shard that
runs it on such a CPU agrees with float32 as the format promises."""

from __future__ import annotations

import pytest
import torch

from teeshard.model import native
from teeshard.model.checkpoint import Checkpoint
from teeshard.model.formats import NativeBf16Linear, onednn_bf16_available
from teeshard.model.layer_range import LayerRange
from teeshard.model.loader import load_shard
from tests.checkpoints import TinyModel
from tests.model.test_formats import assert_agrees_with_float32

pytestmark = pytest.mark.skipif(
    not native.bf16_fits(4, 16), reason=f"no native kernel here: {native.unavailable_reason()}"
)


def weight(channels: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(channels, width, generator=generator)
    return (w * torch.logspace(-3, 1, channels)[:, None]).to(torch.bfloat16)


@pytest.mark.parametrize(("rows", "channels", "width"), [(1, 64, 64), (3, 36, 48), (7, 132, 2048)])
def test_product_matches_a_float64_reference(rows: int, channels: int, width: int) -> None:
    w = weight(channels, width)
    x = torch.randn(rows, width)
    got = native.bf16_matmul(x, native.block_weight(w))
    want = x.double() @ w.double().t()
    assert got.dtype == torch.float32 and got.shape == (rows, channels)
    # float32 rounding: K/8 sequential sums per lane, four to add the lanes
    bound = (x.double().abs() @ w.double().abs().t()) * (width // 8 + 4) * 2**-24
    assert bool(((got.double() - want).abs() <= bound + 1e-30).all())
    assert got.abs().max().item() > 0


def test_each_row_is_bit_for_bit_what_it_is_alone() -> None:
    blocked = native.block_weight(weight(44, 256, seed=1))
    x = torch.randn(11, 256)
    alone = torch.cat([native.bf16_matmul(x[i : i + 1].contiguous(), blocked) for i in range(11)])
    for rows in range(1, 12):
        assert torch.equal(native.bf16_matmul(x[:rows].contiguous(), blocked), alone[:rows])
    shuffled = torch.randperm(11)
    assert torch.equal(native.bf16_matmul(x[shuffled].contiguous(), blocked), alone[shuffled])


def test_bad_arguments_are_refused() -> None:
    w, x = weight(8, 64), torch.randn(2, 64)
    blocked = native.block_weight(w)
    with pytest.raises(native.NativeKernelError, match="no kernel for a 6x64"):
        native.bf16_matmul(x, w[:6].contiguous())
    with pytest.raises(native.NativeKernelError, match="no kernel for a 8x40"):
        native.bf16_matmul(torch.randn(2, 40), w[:, :40].contiguous())
    with pytest.raises(native.NativeKernelError, match="float32"):
        native.bf16_matmul(x.double(), blocked)
    with pytest.raises(native.NativeKernelError, match="bfloat16"):
        native.bf16_matmul(x, blocked.float())
    with pytest.raises(native.NativeKernelError, match="contiguous"):
        native.bf16_matmul(torch.randn(64, 2).t(), blocked)
    with pytest.raises(native.NativeKernelError, match="2-D"):
        native.bf16_matmul(x[None], blocked)
    assert native.bf16_matmul(x, blocked).shape == (2, 8)  # the same call, well formed


def test_layer_with_bias_matches_the_plain_linear() -> None:
    linear = torch.nn.Linear(64, 24, bias=True).to(torch.bfloat16)
    layer = NativeBf16Linear(linear)
    x = torch.randn(2, 3, 64)
    got = layer(x)
    want = x @ linear.weight.float().t() + linear.bias.float()
    assert got.shape == (2, 3, 24) and got.dtype == torch.float32
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.skipif(onednn_bf16_available(), reason="oneDNN runs bfloat16 on this CPU")
def test_a_bfloat16_shard_runs_it_and_agrees_with_float32(tiny_model: TinyModel) -> None:
    """Where oneDNN has no bfloat16 path, every bfloat16 linear and the head take the
    native kernel, and the format's promised tolerances hold."""
    checkpoint, layers = Checkpoint(tiny_model.path), LayerRange(0, tiny_model.num_layers)
    shard = load_shard(checkpoint, layers, torch.bfloat16)
    linears = [m for m in shard.modules() if isinstance(m, NativeBf16Linear)]
    assert len(linears) == 4 * tiny_model.num_layers + 1  # fused products and the head
    assert not any(isinstance(m, torch.nn.Linear) for m in shard.modules())
    assert_agrees_with_float32(shard, load_shard(checkpoint, layers), "bfloat16")
