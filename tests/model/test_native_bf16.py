"""teeshard's bfloat16 kernels (AVX-512 BF16 where the CPU has it; AVX2 for CPUs
without BF16 instructions): exact enough, batch-invariant bit for bit, strict about
their arguments, and a bfloat16 shard that runs them agrees with float32 as the
format promises."""

from __future__ import annotations

import pytest
import torch

from teeshard.model import native
from teeshard.model.checkpoint import Checkpoint
from teeshard.model.formats import BF16_KERNEL_ENV, onednn_bf16_available
from teeshard.model.layer_range import LayerRange
from teeshard.model.linears import NativeBf16Linear
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


ISAS = native.bf16_isas() if native.available() else ()  # every kernel this CPU runs


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    ("rows", "channels", "width"), [(1, 64, 64), (3, 36, 48), (7, 132, 2048), (19, 48, 96)]
)
def test_product_matches_a_float64_reference(
    rows: int, channels: int, width: int, isa: str
) -> None:
    """Shapes a kernel cannot take are refused, not computed wrong."""
    w = weight(channels, width)
    x = torch.randn(rows, width)
    if channels % native.BF16_ISAS[isa][0]:
        with pytest.raises(native.NativeKernelError, match=f"no {isa} kernel for a {channels}x"):
            native.bf16_matmul(x, w, isa=isa)
        return
    got = native.bf16_matmul(x, native.lay_out_weight(w, isa), isa=isa)
    taken = x if isa == "avx2" else x.to(torch.bfloat16)  # AVX-512 BF16 rounds x first
    want = taken.double() @ w.double().t()
    assert got.dtype == torch.float32 and got.shape == (rows, channels)
    # float32 rounding: at most K sequential roundings per lane, four to add the lanes
    bound = (taken.double().abs() @ w.double().abs().t()) * (width + 4) * 2**-24
    assert bool(((got.double() - want).abs() <= bound + 1e-30).all())
    assert got.abs().max().item() > 0


@pytest.mark.parametrize("isa", ISAS)
def test_each_row_is_bit_for_bit_what_it_is_alone(isa: str) -> None:
    laid_out = native.lay_out_weight(weight(48, 256, seed=1), isa)
    x = torch.randn(19, 256)

    def product(rows: torch.Tensor) -> torch.Tensor:
        return native.bf16_matmul(rows.contiguous(), laid_out, isa=isa)

    alone = torch.cat([product(x[i : i + 1]) for i in range(19)])
    for rows in range(1, 20):  # every remainder of the kernels' row blocks
        assert torch.equal(product(x[:rows]), alone[:rows])
    shuffled = torch.randperm(19)
    assert torch.equal(product(x[shuffled]), alone[shuffled])


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
    with pytest.raises(native.NativeKernelError, match="no avx512vnni kernel"):
        native.bf16_matmul(x, blocked, isa="avx512vnni")  # w8a8's, not a bfloat16 kernel
    assert native.bf16_matmul(x, blocked).shape == (2, 8)  # the same call, well formed


def test_layer_with_bias_matches_the_plain_linear() -> None:
    linear = torch.nn.Linear(64, 24, bias=True).to(torch.bfloat16)
    layer = NativeBf16Linear(linear)
    x = torch.randn(2, 3, 64)
    got = layer(x)
    want = x @ linear.weight.float().t() + linear.bias.float()
    assert got.shape == (2, 3, 24) and got.dtype == torch.float32
    assert (got - want).abs().max().item() < 1e-4


NATIVE_SERVES = not onednn_bf16_available() or native.bf16_isa(16, 16) == "avx512bf16"


@pytest.mark.skipif(not NATIVE_SERVES, reason="oneDNN serves bfloat16 on this CPU")
def test_a_bfloat16_shard_runs_it_and_agrees_with_float32(tiny_model: TinyModel) -> None:
    """Where the AVX-512 BF16 kernel runs, or oneDNN has no bfloat16 path, every
    bfloat16 linear and the head take a native kernel, and the format's promised
    tolerances hold."""
    checkpoint, layers = Checkpoint(tiny_model.path), LayerRange(0, tiny_model.num_layers)
    shard = load_shard(checkpoint, layers, torch.bfloat16)
    linears = [m for m in shard.modules() if isinstance(m, NativeBf16Linear)]
    assert len(linears) == 4 * tiny_model.num_layers + 1  # fused products and the head
    assert {m.isa for m in linears} == {ISAS[0]}  # the fastest kernel this CPU runs
    assert not any(isinstance(m, torch.nn.Linear) for m in shard.modules())
    assert_agrees_with_float32(shard, load_shard(checkpoint, layers), "bfloat16")


def test_the_kernel_choice_is_checked(
    tiny_model: TinyModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint, layers = Checkpoint(tiny_model.path), LayerRange(0, 1)
    monkeypatch.setenv(BF16_KERNEL_ENV, "fastest")
    with pytest.raises(ValueError, match="choose auto or onednn"):
        load_shard(checkpoint, layers, torch.bfloat16)
