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
    int8_a16_reference,
    quantize_int8,
    quantize_rows_int16,
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


LANES = {"avx512": 16, "avx2": 8}  # the float32 kernels'; avx512vnni sums integers


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    ("rows", "channels", "width"),
    [(1, 64, 64), (3, 37, 48), (7, 132, 2048), (6, 12, 80), (8, 9, 80), (9, 48, 5632)],
)
def test_product_matches_a_float64_reference(
    rows: int, channels: int, width: int, isa: str
) -> None:
    """Channel counts that are not a multiple of the kernel's block (4, or 16 for
    avx512vnni) are refused; row counts that are not a multiple of its row block take
    its smaller blocks."""
    q, scale = quantized(channels, width)
    x = torch.randn(rows, width)
    if channels % native.INT8_ISAS[isa][0]:  # refused, not computed wrong
        with pytest.raises(native.NativeKernelError, match=f"no {isa} kernel"):
            native.int8_matmul(x, q, scale, isa=isa)
        return
    got = native.int8_matmul(x, native.lay_out_weight(q, isa), scale, isa=isa)
    weight = dequantize_int8(q, scale).double()
    want = x.double() @ weight.t()
    assert got.dtype == torch.float32 and got.shape == (rows, channels)
    magnitude = x.double().abs() @ weight.abs().t()
    if isa == "avx512vnni":
        # each input within half a step of its row's 16-bit grid; then exact integer
        # sums, one rounding to float32 and two products
        step = x.abs().amax(dim=1).double() / 32767
        bound = step[:, None] / 2 * weight.abs().sum(dim=1)[None, :] + magnitude * 4 * 2**-24
    else:  # float32: K/lanes sequential sums per lane, four to add the lanes, one scaling
        bound = magnitude * (width // LANES[isa] + 5) * 2**-24
    assert bool(((got.double() - want).abs() <= bound + 1e-30).all())


a16_only = pytest.mark.skipif("avx512vnni" not in ISAS, reason="this CPU has no AVX-512 VNNI")


@a16_only
@pytest.mark.parametrize(
    ("rows", "channels", "width"), [(1, 16, 16), (5, 48, 2048), (19, 32, 96), (8, 16, 5632)]
)
def test_the_vnni_kernel_gives_the_reference_bits(rows: int, channels: int, width: int) -> None:
    """Its integer sums are exact: the torch reference's float64 sums give the same bits,
    rows of every scale, a zero row and a row of one spike included."""
    q, scale = quantized(channels, width, seed=rows)
    x = torch.randn(rows, width) * torch.logspace(-4, 3, rows)[:, None]
    x[-1, 3] = 1e4  # one outlier: the rest of its row on a coarse grid
    if rows > 1:
        x[rows // 2] = 0.0
    got = native.int8_matmul(x, native.lay_out_weight(q, "avx512vnni"), scale, isa="avx512vnni")
    assert torch.equal(got, int8_a16_reference(x, q, scale))
    assert rows == 1 or not bool(got[rows // 2].any())  # a zero row stays zero


@a16_only
def test_the_vnni_sums_stay_exact_at_full_scale_over_the_widest_input() -> None:
    """The kernel's three int32 sums reach 255 * 127 * K at most: every input at full
    scale (+32767 is all-ones bytes, -32767 the smallest offset) times every weight at
    +-127, over the widest width it takes, still gives the reference's bits."""
    width = native.INT8_A16_MAX_WIDTH - 16
    q = torch.full((32, width), 127, dtype=torch.int8)
    q[16:] = -127
    scale = torch.full((32,), 0.5, dtype=torch.bfloat16)
    x = torch.ones(3, width)
    x[1] = -1.0
    x[2, ::2] = -1.0  # signs alternating: the true sums cancel, the offset sums do not
    got = native.int8_matmul(x, native.lay_out_weight(q, "avx512vnni"), scale, isa="avx512vnni")
    assert torch.equal(got, int8_a16_reference(x, q, scale))
    full = 127 * width * 0.5  # x = 1 times 127 * 0.5 over every input
    assert torch.allclose(got[0, :16], torch.full((16,), full), rtol=1e-6)
    assert torch.allclose(got[1, 16:], torch.full((16,), full), rtol=1e-6)
    assert not bool(got[2].any())


def test_rows_are_quantized_to_16_bits_within_half_a_step() -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(5, 96, generator=generator) * torch.logspace(-4, 3, 5)[:, None]
    x[2] = 0.0
    q, scale = quantize_rows_int16(x)
    assert q.dtype == torch.int16 and scale.dtype == torch.float32
    assert int(q.abs().max()) == 32767 and int(q.min()) >= -32767
    error = (q.float() * scale[:, None] - x).abs().amax(dim=1)
    # half a step, and the float32 roundings of x * inv (up to 32767 * 2^-24 of a step)
    # and of q * scale
    assert bool((error <= scale * (0.5 + 32767 * 2**-23) + 1e-30).all())
    assert scale[2].item() == 0.0 and not bool(q[2].any())


@a16_only
def test_inputs_too_wide_for_exact_sums_take_another_kernel() -> None:
    """255 * 127 * K must stay below 2^31: from K = 2^16 the VNNI kernel refuses, and
    the layer takes the next kernel instead of wrong sums."""
    wide = native.INT8_A16_MAX_WIDTH
    assert native.int8_isa(16, wide - 16) == "avx512vnni"
    assert native.int8_isa(16, wide) == next(i for i in ISAS if i != "avx512vnni")
    q = torch.zeros(16, wide, dtype=torch.int8)
    scale = torch.ones(16, dtype=torch.bfloat16)
    with pytest.raises(native.NativeKernelError, match="no avx512vnni kernel"):
        native.int8_matmul(torch.zeros(1, wide), q, scale, isa="avx512vnni")


@pytest.mark.parametrize("isa", ISAS)
def test_each_row_is_bit_for_bit_what_it_is_alone(isa: str) -> None:
    """A session's result never depends on its batch-mates or its place in the batch."""
    q, scale = quantized(48, 256, seed=1)
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
    assert layer.isa == native.int8_isa(12, 48)  # the best kernel for 12 channels
    assert torch.equal(layer.weight, native.lay_out_weight(q, layer.isa))


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
