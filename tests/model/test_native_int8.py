"""teeshard's native int8 kernel: exact enough, batch-invariant bit for bit, strict about
its arguments, and an int8 shard running it agrees with float32 as torch's kernel does."""

from __future__ import annotations

import pytest
import torch

from teeshard.model import native
from teeshard.model.checkpoint import Checkpoint
from teeshard.model.layer_range import LayerRange
from teeshard.model.loader import load_shard
from teeshard.model.quantize import (
    KERNEL_ENV,
    Int8Linear,
    choose_int8_kernel,
    dequantize_int8,
    quantize_int8,
)
from tests.checkpoints import TinyModel
from tests.model.test_formats import assert_agrees_with_float32

pytestmark = pytest.mark.skipif(
    not native.available(), reason=f"no native int8 kernel here: {native.unavailable_reason()}"
)


def quantized(channels: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(channels, width, generator=generator)
    weight *= torch.logspace(-3, 1, channels)[:, None]  # channels of very different ranges
    return quantize_int8(weight)


ISAS = native.int8_isas()  # every kernel this CPU runs is tested, not only the preferred one


LANES = {"avx512": 16, "avx2": 8}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    ("rows", "channels", "width"),
    [(1, 64, 64), (3, 37, 48), (7, 132, 2048), (6, 12, 80), (8, 9, 80)],
)
def test_product_matches_a_float64_reference(
    rows: int, channels: int, width: int, isa: str
) -> None:
    """Channel counts that are not a multiple of 4 are refused; row counts that are not a
    multiple of the kernel's row block take its smaller blocks."""
    q, scale = quantized(channels, width)
    x = torch.randn(rows, width)
    if channels % 4:  # refused, not computed wrong
        with pytest.raises(native.NativeKernelError, match=f"no {isa} kernel"):
            native.int8_matmul(x, q, scale, isa=isa)
        return
    got = native.int8_matmul(x, native.lay_out_weight(q, isa), scale, isa=isa)
    want = x.double() @ dequantize_int8(q, scale).double().t()
    assert got.dtype == torch.float32 and got.shape == (rows, channels)
    # float32 rounding: K/lanes sequential sums per lane, four to add the lanes, one scaling
    steps = width // LANES[isa] + 5
    bound = (x.double().abs() @ dequantize_int8(q, scale).double().abs().t()) * steps * 2**-24
    assert bool(((got.double() - want).abs() <= bound + 1e-30).all())


@pytest.mark.parametrize("isa", ISAS)
def test_each_row_is_bit_for_bit_what_it_is_alone(isa: str) -> None:
    """A session's result never depends on its batch-mates or its place in the batch."""
    q, scale = quantized(44, 256, seed=1)
    x = torch.randn(11, 256)

    def product(rows: torch.Tensor) -> torch.Tensor:
        return native.int8_matmul(rows.contiguous(), native.lay_out_weight(q, isa), scale, isa=isa)

    alone = torch.cat([product(x[i : i + 1]) for i in range(11)])
    for rows in range(1, 12):
        assert torch.equal(product(x[:rows]), alone[:rows])
    shuffled = torch.randperm(11)
    assert torch.equal(product(x[shuffled]), alone[shuffled])


def test_the_widest_kernel_that_fits_runs() -> None:
    assert native.int8_isa(2048, 2048) == ISAS[0]
    assert native.int8_isa(64, 40) is None  # 40 is no multiple of 16
    assert native.int8_isa(37, 64) is None  # 37 channels are no multiple of 4
    for isa in ISAS:
        with pytest.raises(native.NativeKernelError, match=f"no {isa} kernel for a 4x40"):
            native.int8_matmul(torch.randn(1, 40), *quantized(4, 40), isa=isa)


def test_blocking_is_a_reordering_the_layer_undoes() -> None:
    q, scale = quantized(12, 48)
    blocked = native.block_weight(q)
    assert blocked.shape == q.shape and not torch.equal(blocked, q)
    assert torch.equal(blocked.flatten().sort().values, q.flatten().sort().values)
    assert torch.equal(native.unblock_weight(blocked), q)
    layer = Int8Linear(48, 12, bias=False)
    layer.weight, layer.scales = q.clone(), scale
    x = torch.randn(3, 48)
    want = x @ dequantize_int8(q, scale).t()
    for kernel in ("native", "torch", "native"):
        layer.kernel = kernel
        assert torch.equal(layer.stored_weight(), q)
        # torch's kernel rounds activations and output to bfloat16
        assert (layer(x).float() - want).abs().max() <= 0.02 * want.abs().max()
    assert layer.isa == ISAS[0]
    assert torch.equal(layer.weight, native.lay_out_weight(q, ISAS[0]))


def test_bad_arguments_are_refused() -> None:
    q, scale = quantized(8, 64)
    x = torch.randn(2, 64)
    with pytest.raises(native.NativeKernelError, match="no avx2 kernel for a 8x60"):
        native.int8_matmul(torch.randn(2, 60), q[:, :60].contiguous(), scale, isa="avx2")
    with pytest.raises(native.NativeKernelError, match="float32"):
        native.int8_matmul(x.double(), q, scale, isa="avx2")
    with pytest.raises(native.NativeKernelError, match="bfloat16"):
        native.int8_matmul(x, q, scale.float(), isa="avx2")
    with pytest.raises(native.NativeKernelError, match="contiguous"):
        native.int8_matmul(torch.randn(64, 2).t(), q, scale, isa="avx2")
    with pytest.raises(native.NativeKernelError, match="2-D"):
        native.int8_matmul(x[None], q, scale, isa="avx2")
    # the same call, well formed
    assert native.int8_matmul(x, native.block_weight(q), scale, isa="avx2").shape == (2, 8)


def test_layer_bias_and_shape_with_the_native_kernel() -> None:
    layer = Int8Linear(64, 24, bias=True)
    layer.weight, layer.scales = quantized(24, 64)
    layer.bias = torch.randn(24).to(torch.bfloat16)
    layer.kernel = "native"
    x = torch.randn(2, 3, 64)
    got = layer(x)
    want = x @ dequantize_int8(layer.stored_weight(), layer.scales).t() + layer.bias.float()
    assert got.shape == (2, 3, 24) and got.dtype == torch.float32
    assert (got - want).abs().max().item() < 1e-4


def test_the_kernel_can_be_forced_and_a_bad_choice_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    layers = [Int8Linear(64, 16, bias=False), Int8Linear(60, 16, bias=False)]
    for layer in layers:
        layer.weight, layer.scales = quantized(16, layer.in_features)
    monkeypatch.setenv(KERNEL_ENV, "native")
    assert choose_int8_kernel(layers) == "native"
    assert [layer.kernel for layer in layers] == ["native", "torch"]  # width 60 cannot
    monkeypatch.setenv(KERNEL_ENV, "torch")
    assert choose_int8_kernel(layers) == "torch"
    assert {layer.kernel for layer in layers} == {"torch"}
    monkeypatch.setenv(KERNEL_ENV, "fastest")
    with pytest.raises(ValueError, match="auto, native or torch"):
        choose_int8_kernel(layers)
    monkeypatch.delenv(KERNEL_ENV)
    assert choose_int8_kernel(layers) in ("native", "torch")  # measured


@pytest.mark.parametrize("kernel", ["native", "torch"])
def test_int8_shard_agrees_with_float32_with_either_kernel(
    tiny_model: TinyModel, kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tolerances the int8 format promises hold whichever kernel a node picked."""
    checkpoint, layers = Checkpoint(tiny_model.path), LayerRange(0, tiny_model.num_layers)
    monkeypatch.setenv(KERNEL_ENV, kernel)
    shard = load_shard(checkpoint, layers, torch.bfloat16, quantize="int8")
    assert {m.kernel for m in shard.modules() if isinstance(m, Int8Linear)} == {kernel}
    assert_agrees_with_float32(shard, load_shard(checkpoint, layers), "int8")
