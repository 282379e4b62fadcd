"""Weight-only int8 quantization of linear layers: the recipe, and the layer that runs it.

Recipe ``INT8_RECIPE`` (versioned: any change to the numbers it produces needs a new
name, because manifests name it instead of hashing its output):

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

:class:`Int8Linear` computes ``x @ (q * scale)^T`` with
``torch.ops.aten._weight_int8pack_mm`` (bfloat16 activations, int8 weights read
once per step: the fast path on CPUs with AVX-512 VNNI). That kernel needs the
input width to be a multiple of 16; other widths take an exact float32 reference
path instead (only tiny test models have such widths).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INT8_RECIPE = "int8-weight-only/per-output-channel/symmetric-127/bf16-scale-round-up/v1"
QUANTIZE_RECIPES = {"int8": INT8_RECIPE}  # the --quantize choices and the recipe each names

_KERNEL_WIDTH_MULTIPLE = 16  # _weight_int8pack_mm gives garbage (or crashes) otherwise


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"
