"""The w8a8 format: int8 weights (the int8 recipe's) times activations quantized to int8
per row. Its sums are exact integers, so the native kernel and the torch reference
must give the same bits, every row must be what it is alone, and a w8a8 shard must
compute the same logits whichever kernel runs it."""

from __future__ import annotations

import pytest
import torch

from teeshard.model import native
from teeshard.model.checkpoint import Checkpoint
from teeshard.model.formats import NumberFormat
from teeshard.model.layer_range import LayerRange
from teeshard.model.loader import load_shard
from teeshard.model.quantize import (
    INT8_RECIPE,
    KERNEL_ENV,
    W8A8Linear,
    choose_w8a8_kernel,
    dequantize_int8,
    quantize_int8,
    quantize_rows_int8,
    w8a8_reference,
)
from tests.checkpoints import TinyModel

native_only = pytest.mark.skipif(
    not native.w8a8_fits(4, 16), reason=f"no native kernel here: {native.unavailable_reason()}"
)
# every w8a8 kernel this CPU runs is tested, not only the fastest
ISAS = native.w8a8_isas() if native.available() else ()
each_kernel = pytest.mark.parametrize("isa", ISAS)


def weight(channels: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(channels, width, generator=generator)
    return quantize_int8(w * torch.logspace(-3, 1, channels)[:, None])


def test_rows_are_quantized_within_half_a_step() -> None:
    x = torch.randn(5, 96) * torch.logspace(-4, 3, 5)[:, None]
    x[3] = 0.0
    q, scale = quantize_rows_int8(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    error = (q.float() * scale[:, None] - x).abs().amax(dim=1)
    assert bool((error <= scale / 2 * (1 + 1e-5) + 1e-30).all())
    assert scale[3].item() == 0.0 and not bool(q[3].any())  # a zero row stays zero


@each_kernel
@pytest.mark.parametrize(
    ("rows", "channels", "width"),
    [(1, 16, 16), (3, 48, 48), (5, 144, 2048), (9, 64, 5632), (19, 16, 96), (3, 36, 48)],
)
def test_native_kernel_gives_the_reference_bits(
    rows: int, channels: int, width: int, isa: str
) -> None:
    """Shapes a kernel cannot take are refused, not computed wrong."""
    q, scale = weight(channels, width)
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(rows)) * 3
    x[0, 0] = -40.0  # an outlier: the row's scale follows it
    if channels % native.W8A8_ISAS[isa][0]:
        with pytest.raises(native.NativeKernelError, match=f"no {isa} kernel for a {channels}x"):
            native.w8a8_matmul(x, q, scale, isa=isa)
        return
    got = native.w8a8_matmul(x, native.lay_out_weight(q, isa), scale, isa=isa)
    want = w8a8_reference(x, q, scale)
    assert got.shape == (rows, channels) and got.dtype == torch.float32
    assert torch.equal(got, want)
    # and it is the weight-only product but for each input's rounding, half a step
    w = dequantize_int8(q, scale).double()
    exact = x.double() @ w.t()
    _, x_scale = quantize_rows_int8(x)
    bound = (x_scale.double()[:, None] / 2) * w.abs().sum(dim=1)[None, :]
    assert bool(((got.double() - exact).abs() <= bound * (1 + 1e-4) + 1e-6).all())
    assert bool(((got.double() - exact).abs() > 0).any())  # the rounding is real


@each_kernel
def test_each_row_is_bit_for_bit_what_it_is_alone(isa: str) -> None:
    q, scale = weight(48, 256, seed=1)
    blocked = native.lay_out_weight(q, isa)
    x = torch.randn(19, 256)

    def product(rows: torch.Tensor) -> torch.Tensor:
        return native.w8a8_matmul(rows.contiguous(), blocked, scale, isa=isa)

    alone = torch.cat([product(x[i : i + 1]) for i in range(19)])
    for rows in range(1, 20):  # every remainder of the kernels' row blocks (4 and 8)
        assert torch.equal(product(x[:rows]), alone[:rows])
    shuffled = torch.randperm(19)
    assert torch.equal(product(x[shuffled]), alone[shuffled])


@each_kernel
def test_the_widest_input_at_full_scale_sums_exactly(isa: str) -> None:
    """The largest sums the kernels allow: every activation and weight at +-127 over
    the widest input. The AVX-512 kernel's offset sums (activations + 128) pass 2^32
    here and wrap; the true sums, +-127 * 127 * K, still fit in int32 and must come
    out exact."""
    width = native.W8A8_MAX_WIDTH - 16
    q = torch.full((16, width), 127, dtype=torch.int8)
    q[1::2] = -127
    q[8:, : width // 2] *= -1  # mixed signs
    scale = torch.ones(16, dtype=torch.bfloat16)
    x = torch.ones(3, width)
    x[1] = -1.0
    x[2, 1::2] = -1.0
    got = native.w8a8_matmul(x, native.lay_out_weight(q, isa), scale, isa=isa)
    exact = x.double() @ q.double().t()  # xq = 127 x, sx = 1 / 127: the sums / 127
    assert torch.equal(got, w8a8_reference(x, q, scale))
    assert float((got.double() - exact).abs().max()) <= float(exact.abs().max()) * 2**-22
    assert abs(float(got[0, 0]) - 127 * width) <= 127 * width * 2**-22  # no wrap survived


@each_kernel
def test_zero_rows_and_an_empty_batch(isa: str) -> None:
    q, scale = weight(16, 32)
    blocked = native.lay_out_weight(q, isa)
    x = torch.zeros(2, 32)
    assert torch.equal(native.w8a8_matmul(x, blocked, scale, isa=isa), torch.zeros(2, 16))
    assert native.w8a8_matmul(torch.zeros(0, 32), blocked, scale, isa=isa).shape == (0, 16)


@native_only
def test_bad_arguments_are_refused() -> None:
    q, scale = weight(8, 64)
    blocked, x = native.block_weight(q), torch.randn(2, 64)
    with pytest.raises(native.NativeKernelError, match="no kernel for a 6x64"):
        native.w8a8_matmul(x, q[:6].contiguous(), scale[:6].contiguous())
    with pytest.raises(native.NativeKernelError, match="no kernel for a 8x40"):
        native.w8a8_matmul(torch.randn(2, 40), q[:, :40].contiguous(), scale)
    with pytest.raises(native.NativeKernelError, match="float32"):
        native.w8a8_matmul(x.double(), blocked, scale)
    with pytest.raises(native.NativeKernelError, match="bfloat16 scale"):
        native.w8a8_matmul(x, blocked, scale.float())
    with pytest.raises(native.NativeKernelError, match="bfloat16 scale"):
        native.w8a8_matmul(x, blocked, scale[:4].contiguous())
    with pytest.raises(native.NativeKernelError, match="contiguous"):
        native.w8a8_matmul(torch.randn(64, 2).t(), blocked, scale)
    with pytest.raises(native.NativeKernelError, match="no avx512 kernel"):
        native.w8a8_matmul(x, blocked, scale, isa="avx512")  # int8's, not a w8a8 kernel
    with pytest.raises(native.NativeKernelError, match="no avx2 kernel for a 8x131072"):
        wide = torch.zeros(8, native.W8A8_MAX_WIDTH, dtype=torch.int8)
        native.w8a8_matmul(torch.zeros(1, native.W8A8_MAX_WIDTH), wide, scale, isa="avx2")
    assert native.w8a8_matmul(x, blocked, scale).shape == (2, 8)  # the same call, well formed


@pytest.mark.parametrize("channels", [24, 32])  # the AVX-512 kernel takes 32 only
def test_layer_with_bias_and_leading_dimensions(channels: int) -> None:
    layer = W8A8Linear(64, channels, bias=True)
    layer.weight, layer.scales = weight(channels, 64)
    layer.bias = torch.randn(channels).to(torch.bfloat16)
    x = torch.randn(2, 3, 64)
    want = w8a8_reference(x.reshape(6, 64), layer.weight, layer.scales) + layer.bias.float()
    kernels = ("torch", "native", "torch", "native") if layer.supports_native() else ("torch",)
    for kernel in kernels:  # each switch lays the weight out for the kernel, and back
        layer.kernel = kernel
        got = layer(x)
        assert got.shape == (2, 3, channels) and got.dtype == torch.float32
        assert torch.equal(got.reshape(6, channels), want), kernel
        assert torch.equal(layer.stored_weight(), weight(channels, 64)[0])
    if layer.kernel == "native":
        assert layer.isa == native.w8a8_isa(channels, 64)
        assert torch.equal(layer.weight, native.lay_out_weight(weight(channels, 64)[0], layer.isa))


@native_only
def test_a_shard_computes_the_same_logits_with_either_kernel(
    tiny_llama: TinyModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint, layers = Checkpoint(tiny_llama.path), LayerRange(0, tiny_llama.num_layers)
    fast = load_shard(checkpoint, layers, torch.bfloat16, quantize="w8a8")
    monkeypatch.setenv(KERNEL_ENV, "torch")
    reference = load_shard(checkpoint, layers, torch.bfloat16, quantize="w8a8")
    w8a8 = [m for m in fast.modules() if isinstance(m, W8A8Linear)]
    assert len(w8a8) == 4 * tiny_llama.num_layers + 1  # qkv, o, gate/up, down; the head
    assert {m.kernel for m in w8a8} == {"native"}
    assert {m.isa for m in w8a8} == {ISAS[0]}  # the fastest kernel this CPU runs
    assert {m.kernel for m in reference.modules() if isinstance(m, W8A8Linear)} == {"torch"}
    ids = torch.tensor([[3, 17, 250, 33, 101, 7]])
    with torch.no_grad():
        got = fast(fast.embed(ids), fast.new_cache(8))
        want = reference(reference.embed(ids), reference.new_cache(8))
    assert torch.equal(got, want)


def test_recipe_names_the_int8_weights_and_the_activations() -> None:
    fmt = NumberFormat.resolve(None, "w8a8")
    assert fmt == NumberFormat("bfloat16", "w8a8")
    assert fmt.recipe is not None and INT8_RECIPE in fmt.recipe and "activations" in fmt.recipe
    assert fmt.recipe != NumberFormat("bfloat16", "int8").recipe
    assert fmt.quantizes("layers.0.mlp.down_proj.weight") and fmt.quantizes("lm_head.weight")
    assert not fmt.quantizes("layers.0.input_layernorm.weight")
    with pytest.raises(ValueError, match="--dtype bfloat16"):
        NumberFormat("float32", "w8a8")


def test_forcing_the_native_kernel_fails_where_a_layer_cannot_take_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fits, odd = W8A8Linear(64, 8, bias=False), W8A8Linear(40, 6, bias=False)
    fits.weight, fits.scales = weight(8, 64)
    odd.weight, odd.scales = weight(6, 40)
    monkeypatch.setenv(KERNEL_ENV, "native")
    with pytest.raises(RuntimeError, match="cannot take the native kernel"):
        choose_w8a8_kernel([fits, odd])
    monkeypatch.setenv(KERNEL_ENV, "fastest")
    with pytest.raises(ValueError, match="choose auto, native or torch"):
        choose_w8a8_kernel([fits])
    monkeypatch.setenv(KERNEL_ENV, "auto")
    choose_w8a8_kernel([fits, odd])
    assert odd.kernel == "torch"  # the reference: the same bits, slower
    assert fits.kernel == ("native" if fits.supports_native() else "torch")
