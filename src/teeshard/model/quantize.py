"""Weight-only int8 quantization of linear layers: the recipe, and the layer that runs it.

Recipe ``INT8_RECIPE`` (versioned: any change to the numbers it produces needs a new
name, because manifests name it instead of hashing its output). It quantizes every
block linear's weight and the LM head's (v2; v1 kept the head in bfloat16), each
the same way:

* per output channel ``n`` of a weight ``W`` (N, K), taken in float32 from the
  checkpoint's tensor as stored: ``amax[n] = max_k |W[n, k]|``;
* ``scale[n]`` is ``amax[n] / 127`` rounded *up* to the next bfloat16 value (the
  kernel multiplies in bfloat16, so the scale is exactly what the kernel uses, and
  rounding up keeps ``|W / scale| <= 127``); an all-zero channel gets scale 1;
* ``q[n, k] = round_half_even(W[n, k] / scale[n])``, clamped to ``[-127, 127]``.

So every dequantized weight ``q * scale`` is within ``scale[n] / 2`` of the source
(:func:`int8_error_bound`), and the result is a pure function of the source bytes:
the same tensor gives the same int8 bytes on every run and every machine (IEEE
division and rounding, no threads, no randomness).

:class:`Int8Linear` computes ``x @ (q * scale)^T`` with one of two kernels, both
reading the int8 weights once per step (:func:`choose_int8_kernel` picks, per node):

* ``"torch"``: ``torch.ops.aten._weight_int8pack_mm``, bfloat16 activations and
  output. It needs the input width to be a multiple of 16; other widths take an
  exact float32 reference path instead (only tiny test models have such widths).
* ``"native"``: teeshard's kernel (:mod:`teeshard.model.native`), float32 output,
  batch-invariant bit for bit. With AVX-512 VNNI (``int8_avx512vnni.c``) it quantizes
  each input row to 16 bits (:func:`quantize_rows_int16`) and sums the integer
  products exactly: the same bits as :func:`int8_a16_reference`, and a finer grid
  than torch's bfloat16 activations. Elsewhere (AVX-512 without VNNI, or AVX2) it
  multiplies float32 activations.

The recipe fixes the weights; the kernel only the arithmetic around them (the
activations' rounding), so both compute with exactly the weights the manifest pins.

Recipe ``W8A8_RECIPE`` (``--quantize w8a8``): exactly ``INT8_RECIPE``'s weights and
scales, and each product's input rows quantized too, per row and symmetric, when the
product runs (:func:`quantize_rows_int8`). The sums of int8 products are exact in
int32, so :class:`W8A8Linear` gives the same bits with either kernel and whatever a
row's batch-mates: teeshard's AVX-512 VNNI or AVX2 kernel, or :func:`w8a8_reference`
in torch. It
trades the activations' precision (8 bits per row instead of float32) for products
that cost far less per row of a batch on CPUs whose float multiply is the bound.
"""

from __future__ import annotations

import logging
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from teeshard.model import native
from teeshard.model.linears import float32_linear

INT8_RECIPE = (
    "int8-weight-only/per-output-channel/symmetric-127/bf16-scale-round-up/block-linears+lm-head/v2"
)
# the same weights and scales as INT8_RECIPE; each product's input rows quantized too
W8A8_RECIPE = (
    f"w8a8/weights:{INT8_RECIPE}"
    "/activations:per-row-dynamic/symmetric-127/round-half-even/int32-sums/v1"
)
# the --quantize choices and the recipe each names
QUANTIZE_RECIPES = {"int8": INT8_RECIPE, "w8a8": W8A8_RECIPE}

_KERNEL_WIDTH_MULTIPLE = 16  # _weight_int8pack_mm gives garbage (or crashes) otherwise
KERNEL_ENV = "TEESHARD_INT8_KERNEL"  # auto (default: the faster, measured), native or torch
INT8_KERNELS = ("native", "torch")
_CLEAR_WIN = 0.10

log = logging.getLogger(__name__)


def _round_up_bf16(values: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 value >= each float32 value (all values positive here)."""
    rounded = values.to(torch.bfloat16)
    below = rounded.float() < values
    if bool(below.any()):
        # positive bfloat16 values are ordered like their bit patterns: one step up is +1
        bits = rounded.view(torch.int16)
        rounded = torch.where(below, bits + 1, bits).view(torch.bfloat16)
    return rounded


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (N, K) in any float dtype -> (q int8 (N, K), scale bfloat16 (N,))."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"int8 quantization takes a 2-D float weight, got {tuple(weight.shape)}")
    w32 = weight.detach().to(torch.float32)
    if not bool(torch.isfinite(w32).all()):
        raise ValueError("cannot quantize a weight holding NaN or infinity")
    amax = w32.abs().amax(dim=1)  # (N,)
    scale = _round_up_bf16(torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)))
    q = torch.round(w32 / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 weight the kernel computes with."""
    return q.float() * scale.float()[:, None]


def int8_error_bound(scale: torch.Tensor) -> torch.Tensor:
    """Largest ``|dequantized - source|`` per output channel (N,): half a quantization step."""
    return scale.float() / 2


class Int8Linear(nn.Module):
    """``y = x @ (q * scale)^T + bias`` with int8 ``q`` and bfloat16 ``x``, ``scale``, ``y``.

    Buffers, not parameters: ``weight`` (N, K) int8, ``scales`` (N,) bfloat16, and
    ``bias`` (N,) bfloat16 where the source layer had one. Built empty (on the meta
    device, like the rest of a shard's skeleton) and filled by the loader.
    """

    weight: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.bfloat16))
        self.register_buffer(
            "bias", torch.empty(out_features, dtype=torch.bfloat16) if bias else None
        )

    @classmethod
    def like(cls, linear: nn.Linear) -> Int8Linear:
        return cls(linear.in_features, linear.out_features, linear.bias is not None)

    _kernel = "torch"
    isa: str | None = None  # the native kernel's instruction set (native.int8_isa)

    @property
    def kernel(self) -> str:
        """``"torch"`` or ``"native"``, set by :func:`choose_int8_kernel` on a loaded shard.

        Setting it lays the weight out for the kernel: the native kernels read it
        blocked (:func:`teeshard.model.native.lay_out_weight`), torch's as stored; the
        bytes are the same, reordered (:meth:`stored_weight` gives them back as
        stored)."""
        return self._kernel

    @kernel.setter
    def kernel(self, kernel: str) -> None:
        if kernel not in INT8_KERNELS:
            raise ValueError(f"int8 kernel {kernel!r}: choose one of {INT8_KERNELS}")
        if kernel == "native" and not self.supports_native():
            raise ValueError(
                f"no native int8 kernel for a {self.out_features}x{self.in_features} weight here"
            )
        isa = self._native_isa() if kernel == "native" else None
        if native.weight_block(isa) != native.weight_block(self.isa):
            self.weight = native.lay_out_weight(self.stored_weight(), isa)
        self._kernel, self.isa = kernel, isa

    def stored_weight(self) -> torch.Tensor:
        """The int8 weight (N, K) as the recipe made it, whatever the kernel's layout."""
        return native.stored_weight(self.weight, self.isa)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "native":
            return self._float32_forward(x)
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # (M, K)
        if self.in_features % _KERNEL_WIDTH_MULTIPLE == 0:
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales)  # (M, N)
        else:  # reference path: the same product in float32
            out = F.linear(flat.float(), dequantize_int8(self.weight, self.scales)).to(flat.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        kernel = f"native {self.isa}" if self.kernel == "native" else self.kernel
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"int8 ({kernel} kernel)"
        )

    def supports_native(self) -> bool:
        """Whether a native kernel can run this layer here (its shape, the CPU, a compiler)."""
        return (
            self.weight.device.type == "cpu"
            and self._native_isa() is not None
            and native.available()
        )

    def _native_isa(self) -> str | None:
        return native.int8_isa(self.out_features, self.in_features)

    def _float32_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward of the float32-output kernels: rows in float32, bias in float32."""
        return float32_linear(x, self._float32_product, self.bias, self.out_features)

    def _float32_product(self, flat32: torch.Tensor) -> torch.Tensor:
        return self._bound()(flat32)

    _binding: tuple[tuple[int, int, str | None], native.BoundProduct] | None = None

    def _bound(self) -> native.BoundProduct:
        """The native product with this layer's weight and scales bound: bound anew
        whenever either tensor or the kernel changed (the loader fills the buffers
        after the layer is built, and choosing a kernel lays the weight out anew)."""
        key = (self.weight.data_ptr(), self.scales.data_ptr(), self.isa)
        if self._binding is None or self._binding[0] != key:
            assert self.isa is not None
            self._binding = (key, self._bind(self.isa))
        return self._binding[1]

    def _bind(self, isa: str) -> native.BoundProduct:
        return native.bind_int8(self.weight, self.scales, isa=isa)


def quantize_rows_int16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 rows (M, K) -> (int16 (M, K), float32 scale (M,)) as the int8 format's
    AVX-512 VNNI kernel quantizes a product's input (``native/int8_avx512vnni.c``):
    :func:`quantize_rows_int8`'s steps with 32767 levels each side for 127."""
    return _quantize_rows(x, 32767, torch.int16)


def int8_a16_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The int8 product of the AVX-512 VNNI kernel, in torch, bit for bit: ``x`` float32
    (M, K), each row quantized to int16 (:func:`quantize_rows_int16`), ``q`` int8 (N, K)
    as stored, ``scale`` bfloat16 (N,); the integer sums exact, rounded once to float32."""
    xq, x_scale = quantize_rows_int16(x)
    # float64 holds every partial sum exactly (|sum| < 32767 * 127 * K < 2^53)
    sums = (xq.double() @ q.double().t()).float()
    return sums * (x_scale[:, None] * scale.float()[None, :])


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 rows (M, K) -> (int8 (M, K), float32 scale (M,)) as the w8a8 recipe
    quantizes a product's input, each step the one IEEE float32 operation the native
    kernel makes (``native/w8a8_avx2.c``): ``amax`` per row, ``inv = 127 / amax``,
    ``round_half_even(x * inv)`` clamped to [-127, 127], scale ``amax / 127``; a zero
    row gets zeros and scale 0."""
    return _quantize_rows(x, 127, torch.int8)


def _quantize_rows(
    x: torch.Tensor, levels: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``x`` symmetric on ``levels`` steps each side of 0, as integers of
    ``dtype``, and its float32 scale (``amax / levels``; 0 for a zero row)."""
    amax = x.abs().amax(dim=1)
    some = amax > 0
    # a true division: torch's `127.0 / t` is a reciprocal and a product, two roundings
    inv = torch.where(some, torch.full_like(amax, float(levels)).div(amax), torch.zeros_like(amax))
    scale = torch.where(some, amax.div(float(levels)), torch.zeros_like(amax))
    q = torch.round(x * inv[:, None]).clamp_(-levels, levels).to(dtype)
    return q, scale


def w8a8_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The w8a8 product in torch, bit for bit what the native kernel gives:
    ``x`` float32 (M, K), ``q`` int8 (N, K) as stored, ``scale`` bfloat16 (N,)."""
    xq, x_scale = quantize_rows_int8(x)
    if x.shape[0] == 0:
        sums = torch.zeros(0, q.shape[0], dtype=torch.int32)
    else:  # exact int32 sums (slow on CPU: the reference, not the fast path)
        sums = torch._int_mm(xq, q.t())
    return sums.float() * (x_scale[:, None] * scale.float()[None, :])


class W8A8Linear(Int8Linear):
    """An int8 linear (the same weights, scales and layout as :class:`Int8Linear`)
    whose input rows are quantized to int8 too, per row (the ``w8a8`` format): int32
    sums, exact, so batch-invariant and the same bits on every machine and kernel.

    Kernels: ``"native"`` (``native/w8a8_avx512.c`` with AVX-512 VNNI, else
    ``native/w8a8_avx2.c``) where the layer's shape and the CPU allow, else ``"torch"``
    (:func:`w8a8_reference`): the same bits from each, at different speeds.
    float32 output; the bias (bfloat16) is added in float32."""

    def _native_isa(self) -> str | None:
        return native.w8a8_isa(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._float32_forward(x)

    def _float32_product(self, flat32: torch.Tensor) -> torch.Tensor:
        if self.kernel == "native":
            return self._bound()(flat32)
        return w8a8_reference(flat32, self.weight, self.scales)

    def _bind(self, isa: str) -> native.BoundProduct:
        return native.bind_w8a8(self.weight, self.scales, isa=isa)

    def extra_repr(self) -> str:
        return super().extra_repr().replace("int8 (", "int8 weights and activations (")


def choose_w8a8_kernel(layers: list[W8A8Linear]) -> None:
    """The native kernel for every layer it fits here, the reference for the others:
    both give the same bits, so nothing is measured. ``$TEESHARD_INT8_KERNEL=torch``
    forces the reference (for tests); ``native`` fails where a layer cannot take it."""
    wanted = _wanted_kernel()
    unfit = [layer for layer in layers if not layer.supports_native()]
    if wanted == "native" and unfit:
        raise RuntimeError(
            f"{KERNEL_ENV}=native, but {len(unfit)} w8a8 layers cannot take the native "
            f"kernel: {native.unavailable_reason() or 'a layer shape does not fit it'}"
        )
    forced = wanted == "torch"
    for layer in layers:
        layer.kernel = "native" if layer.supports_native() and not forced else "torch"
    slow = sum(layer.kernel == "torch" for layer in layers)
    if slow and not forced:
        log.warning(
            "%d of %d w8a8 layers take the slow reference product (no native kernel: %s)",
            slow, len(layers), native.unavailable_reason() or "a layer's shape does not fit it",
        )  # fmt: skip


def _wanted_kernel() -> str:
    """``$TEESHARD_INT8_KERNEL``: auto (the default), native or torch."""
    wanted = os.environ.get(KERNEL_ENV, "auto")
    if wanted not in ("auto", *INT8_KERNELS):
        raise ValueError(f"{KERNEL_ENV}={wanted!r}: choose auto, native or torch")
    return wanted


def _time_once(layer: Int8Linear, x: torch.Tensor, times: list[float]) -> None:
    started = time.perf_counter()
    layer(x)
    times.append(time.perf_counter() - started)


def _probe_copy(layer: Int8Linear, kernel: str) -> Int8Linear:
    """A copy of ``layer`` running ``kernel``, its weight laid out for it."""
    copy = Int8Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    copy.weight, copy.scales, copy.bias = layer.stored_weight().clone(), layer.scales, layer.bias
    copy.kernel = kernel
    return copy


@torch.no_grad()
def choose_int8_kernel(layers: list[Int8Linear], reps: int = 5) -> str:
    """Set every layer's kernel to the faster one here, measured, or to ``$TEESHARD_INT8_KERNEL``.

    Which is faster depends on the CPU (torch's kernel and teeshard's each have their
    own AVX-512 and AVX2 paths), so it is measured: copies of the widest of
    ``layers``, 1 and 8 rows, both kernels interleaved, ``reps`` times;
    torch's wins only if its sum of medians is lower by more than a tenth, so near
    a tie the choice is stable and native (batch-invariant, its float32 activations
    the more precise). A few tens of milliseconds per node start. Returns the choice.
    """
    wanted = _wanted_kernel()
    eligible = [layer for layer in layers if layer.supports_native()]
    choice = "torch"
    if not eligible or not native.available():
        reason = native.unavailable_reason() or "no layer fits it"
        if wanted == "native":
            raise RuntimeError(
                f"{KERNEL_ENV}=native, but the native int8 kernel cannot run: {reason}"
            )
        log.info("int8 kernel: torch (native: %s)", reason)
    elif wanted != "auto":
        choice = wanted
    else:
        widest = max(eligible, key=lambda layer: layer.weight.numel())
        probes = {kernel: _probe_copy(widest, kernel) for kernel in INT8_KERNELS}
        cost = dict.fromkeys(INT8_KERNELS, 0.0)
        for rows in (1, 8):
            x = torch.randn(1, rows, widest.in_features)
            times: dict[str, list[float]] = {kernel: [] for kernel in INT8_KERNELS}
            for kernel in INT8_KERNELS:
                probes[kernel](x)  # warm up
            for rep in range(reps):
                for kernel in INT8_KERNELS if rep % 2 == 0 else reversed(INT8_KERNELS):
                    _time_once(probes[kernel], x, times[kernel])
            for kernel in INT8_KERNELS:
                cost[kernel] += statistics.median(times[kernel])
        # torch's must win clearly: near a tie, timing noise would flip the choice
        choice = "torch" if cost["torch"] < cost["native"] * (1 - _CLEAR_WIN) else "native"
        log.info(
            "int8 kernel: %s (1 + 8 rows of %dx%d: native %s %.2f ms, torch %.2f ms)",
            choice, widest.out_features, widest.in_features, probes["native"].isa,
            cost["native"] * 1e3, cost["torch"] * 1e3,
        )  # fmt: skip
    for layer in layers:
        layer.kernel = choice if layer.supports_native() else "torch"
    return choice
