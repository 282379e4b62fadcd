"""The linear modules a format's layers run on, each with its weight laid out once at
load for one kernel: oneDNN's packed product (:class:`PackedLinear`) or one of
teeshard's own (:class:`NativeBf16Linear`, :class:`NativeF32Linear`, over
:mod:`teeshard.model.native`). :mod:`teeshard.model.formats` chooses which serves.

Why repacking: with torch's default path a one-row bfloat16 ``F.linear`` here runs
oneDNN's matmul on a plain-layout weight, reordering it on every call, and is
*slower* than float32. With the weight reordered once into oneDNN's blocked layout
(``mkldnn._reorder_linear_weight``) and run by ``mkldnn._linear_pointwise``, the
same product reads the weight once: the fast path (``benchmarks/throughput.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from teeshard.model import native


class PackedLinear(nn.Module):
    """A linear whose weight oneDNN reordered once into its blocked layout, computing in
    the weight's dtype (bfloat16, or float32 for float32 linears and heads).

    The packed weight is an opaque oneDNN tensor, kept as a plain attribute (not a
    parameter or buffer: it has no strides to save or move); inference only.
    """

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.dtype = dtype
        weight = linear.weight.detach().to(dtype).contiguous()
        self.weight_bytes = weight.numel() * weight.element_size()  # what the plan counts
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        bias = linear.bias
        self.bias = bias.detach().to(dtype) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            x, self.packed, self.bias, "none", [], ""
        )
        return out

    def extra_repr(self) -> str:
        kind = "bf16" if self.dtype == torch.bfloat16 else str(self.dtype).removeprefix("torch.")
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN {kind}"


class NativeLinear(nn.Module):
    """A linear on one of teeshard's own kernels (:mod:`teeshard.model.native`), its
    weight laid out once at load for the kernel the CPU runs; float32 output,
    batch-invariant bit for bit. Inference only; the laid-out weight is a plain
    attribute. Subclasses name the weight's dtype and the kernel."""

    weight_dtype: torch.dtype
    label: str  # for repr

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach().to(self.weight_dtype).contiguous()
        self.weight_bytes = weight.numel() * weight.element_size()
        isa = self.kernel_for(self.out_features, self.in_features)
        if isa is None:
            raise ValueError(
                f"no native {self.label} kernel for a {tuple(weight.shape)} weight here"
            )
        self.isa: str = isa
        self.laid_out = native.lay_out_weight(weight, isa)
        self._product = self.bind(self.laid_out, isa=isa)  # checked once, not per call
        bias = linear.bias
        self.bias = bias.detach().float() if bias is not None else None

    # the kernel that would run a (channels, width) weight here, if any
    kernel_for: Callable[[int, int], str | None]
    # the ``isa`` kernel's product with the laid-out weight bound
    bind: Callable[..., native.BoundProduct]

    @classmethod
    def isa_for(cls, linear: nn.Module) -> str | None:
        """The native kernel that would run ``linear``, if any."""
        if not isinstance(linear, nn.Linear) or linear.weight.device.type != "cpu":
            return None
        return cls.kernel_for(linear.out_features, linear.in_features)

    @classmethod
    def fits(cls, linear: nn.Module) -> bool:
        return cls.isa_for(linear) is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return float32_linear(x, self._product, self.bias, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"native {self.label} ({self.isa})"
        )


class NativeBf16Linear(NativeLinear):
    """A bfloat16 linear on teeshard's kernel (:func:`teeshard.model.native.bf16_matmul`).

    With AVX-512 BF16 (``bf16_avx512.c``): activations rounded to bfloat16 as oneDNN
    takes them, ``vdpbf16ps``; it streams the weight faster than oneDNN's packed
    product at decode and keeps pace at prefill, so it serves where it can. Without
    BF16 instructions (``bf16_avx2.c``): float32 activations and FMAs on exactly
    widened weights, where oneDNN has no bfloat16 path and torch's generic product
    costs about one product per row."""

    weight_dtype = torch.bfloat16
    label = "bf16"
    kernel_for = staticmethod(native.bf16_isa)
    bind = staticmethod(native.bind_bf16)


class NativeF32Linear(NativeLinear):
    """A float32 linear on teeshard's AVX-512 kernel (:func:`teeshard.model.native.f32_matmul`):
    it streams the weight about twice as fast as oneDNN's packed float32 product at
    decode (one to eight rows) and is a little faster at prefill, on an AMD EPYC Zen 4
    (``benchmarks/linear_rows.py``). Sums run in input order per channel: a row's
    result is the same whatever its batch-mates."""

    weight_dtype = torch.float32
    label = "f32"
    kernel_for = staticmethod(native.f32_isa)
    bind = staticmethod(native.bind_f32)


def float32_linear(
    x: torch.Tensor,
    product: Callable[[torch.Tensor], torch.Tensor],
    bias: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    """``x`` (..., K) through a float32-output ``product`` of rows (M, K) -> (M, N), the
    bias added in float32: (..., N). The rows go in as a view where they already are
    contiguous float32 (the usual case: each conversion would cost a dispatch)."""
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    if flat.dtype != torch.float32:
        flat = flat.float()
    out = product(flat if flat.is_contiguous() else flat.contiguous())
    if bias is not None:
        out += bias
    return out.reshape(*lead, out_features)
