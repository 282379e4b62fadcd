"""teeshard's float32 kernel (AVX-512): exact to float32 rounding, batch-invariant bit for
bit, strict about its arguments; a float32 shard runs it for every linear and gives the
numbers oneDNN's packed product gives, within float32 rounding."""

from __future__ import annotations

import pytest
import torch

from teeshard.model import native
from teeshard.model.checkpoint import Checkpoint
from teeshard.model.formats import F32_KERNEL_ENV
from teeshard.model.layer_range import LayerRange
from teeshard.model.linears import NativeF32Linear, PackedLinear
from teeshard.model.loader import load_shard
from tests.checkpoints import TinyModel
from tests.model.test_formats import (
    FUSED_LINEARS_PER_LAYER,
    assert_no_default_linear,
    generate,
    profiled_ops,
)

pytestmark = pytest.mark.skipif(
    not native.f32_isas() or not native.available(),
    reason=f"no AVX-512 float32 kernel here: {native.unavailable_reason() or 'no AVX-512'}",
)


def weight(channels: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(channels, width, generator=generator)
    return w * torch.logspace(-3, 1, channels)[:, None]


@pytest.mark.parametrize(
    ("rows", "channels", "width"), [(1, 64, 64), (3, 48, 48), (7, 144, 2048), (19, 16, 96)]
)
def test_product_matches_a_float64_reference(rows: int, channels: int, width: int) -> None:
    w, x = weight(channels, width), torch.randn(rows, width)
    got = native.f32_matmul(x, native.lay_out_weight(w, "avx512f"))
    want = x.double() @ w.double().t()
    assert got.dtype == torch.float32 and got.shape == (rows, channels)
    # one rounding per fused multiply-add, K of them per sum
    bound = (x.double().abs() @ w.double().abs().t()) * width * 2**-24
    assert bool(((got.double() - want).abs() <= bound + 1e-30).all())
    assert got.abs().max().item() > 0


def test_the_layout_matters() -> None:
    """The kernel reads the blocked layout: the weight as stored gives other numbers."""
    w, x = weight(32, 64), torch.randn(2, 64)
    want = x @ w.t()
    assert torch.allclose(
        native.f32_matmul(x, native.lay_out_weight(w, "avx512f")), want, atol=1e-4
    )
    assert not torch.allclose(native.f32_matmul(x, w), want, atol=1e-2)


def test_each_row_is_bit_for_bit_what_it_is_alone() -> None:
    laid_out = native.lay_out_weight(weight(48, 256, seed=1), "avx512f")
    x = torch.randn(19, 256)

    def product(rows: torch.Tensor) -> torch.Tensor:
        return native.f32_matmul(rows.contiguous(), laid_out)

    alone = torch.cat([product(x[i : i + 1]) for i in range(19)])
    for rows in range(1, 20):  # every remainder of the kernel's row blocks
        assert torch.equal(product(x[:rows]), alone[:rows])
    shuffled = torch.randperm(19)
    assert torch.equal(product(x[shuffled]), alone[shuffled])


def test_bad_arguments_are_refused() -> None:
    w, x = weight(32, 64), torch.randn(2, 64)
    laid_out = native.lay_out_weight(w, "avx512f")
    with pytest.raises(native.NativeKernelError, match="no kernel for a 8x64"):
        native.f32_matmul(x, w[:8].contiguous())  # 16 channels a block
    with pytest.raises(native.NativeKernelError, match="no kernel for a 32x40"):
        native.f32_matmul(torch.randn(2, 40), w[:, :40].contiguous())
    with pytest.raises(native.NativeKernelError, match="float32"):
        native.f32_matmul(x.double(), laid_out)
    with pytest.raises(native.NativeKernelError, match="float32 \\(N, K\\)"):
        native.f32_matmul(x, laid_out.to(torch.bfloat16))
    with pytest.raises(native.NativeKernelError, match="contiguous"):
        native.f32_matmul(torch.randn(64, 2).t(), laid_out)
    with pytest.raises(native.NativeKernelError, match="2-D"):
        native.f32_matmul(x[None], laid_out)
    with pytest.raises(native.NativeKernelError, match="no avx512bf16 kernel"):
        native.f32_matmul(x, laid_out, isa="avx512bf16")  # a bfloat16 kernel
    assert native.f32_matmul(x, laid_out).shape == (2, 32)  # the same call, well formed


def test_layer_with_bias_matches_the_plain_linear() -> None:
    linear = torch.nn.Linear(64, 48, bias=True)
    layer = NativeF32Linear(linear)
    x = torch.randn(2, 3, 64)
    got = layer(x)
    assert got.shape == (2, 3, 48) and got.dtype == torch.float32
    assert (got - linear(x)).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="no native f32 kernel for a \\(40, 64\\) weight"):
        NativeF32Linear(torch.nn.Linear(64, 40))


def test_every_float32_linear_takes_it_and_agrees_with_onednn(
    tiny_llama: TinyModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every float32 linear and the head run the kernel (no oneDNN, no default
    product); greedy tokens equal oneDNN's packed product's and logits agree to float32
    rounding over a generation."""
    checkpoint, layers = Checkpoint(tiny_llama.path), LayerRange(0, tiny_llama.num_layers)
    shard = load_shard(checkpoint, layers)
    ops = profiled_ops(shard)
    assert "mkldnn::_linear_pointwise" not in ops
    assert_no_default_linear(ops, shard)
    linears = [m for m in shard.modules() if isinstance(m, NativeF32Linear)]
    assert len(linears) == FUSED_LINEARS_PER_LAYER * tiny_llama.num_layers + 1
    assert {m.isa for m in linears} == {"avx512f"}
    monkeypatch.setenv(F32_KERNEL_ENV, "onednn")
    onednn = load_shard(checkpoint, layers)
    assert isinstance(onednn.lm_head, PackedLinear)
    tokens, logits = generate(shard)
    onednn_tokens, onednn_logits = generate(onednn, forced=tokens)
    assert tokens == onednn_tokens
    assert (logits - onednn_logits).abs().max().item() < 1e-4


def test_a_float16_shard_runs_its_float32_head_on_it(tiny_llama: TinyModel) -> None:
    shard = load_shard(
        Checkpoint(tiny_llama.path), LayerRange(2, tiny_llama.num_layers), torch.float16
    )
    assert isinstance(shard.lm_head, NativeF32Linear)
    assert not any(isinstance(m, NativeF32Linear) for m in shard.layers.modules())


def test_the_kernel_choice_is_checked(
    tiny_llama: TinyModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(F32_KERNEL_ENV, "fastest")
    with pytest.raises(ValueError, match="choose auto or onednn"):
        load_shard(Checkpoint(tiny_llama.path), LayerRange(0, 1))
