"""A block's RMS norms, rotary pass and SwiGLU in one native call each (``block_ops.c``).

A decode step runs each layer's two norms, its rotary pass and its SwiGLU on one
row per session: arithmetic worth a few microseconds, spread over 20 torch
operators that each pay their dispatch. These functions compute the same float32
results (rotary bit for bit; the norm within a rounding, its sum of squares added
in another order; SwiGLU within a rounding or two, its exponential a polynomial)
in one call each, and return None where they cannot run (no native library,
another dtype or device, a layout they do not take), so that the caller keeps
torch's operators: :class:`teeshard.model.transformer.RMSNorm`,
:class:`teeshard.model.transformer.Attention` and
:class:`teeshard.model.transformer.MLP`.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch

from teeshard.model.native import NativeKernelError, _build


@functools.cache
def _functions() -> tuple[Callable[..., int], Callable[..., int], Callable[..., int]] | None:
    library = _build()[0]
    if library is None:
        return None
    norm, rope = library.teeshard_rms_norm, library.teeshard_rope
    swiglu = library.teeshard_silu_mul
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    # x, x row stride, weight, eps, y, rows, width
    norm.argtypes = [pointer, size, pointer, ctypes.c_float, pointer, size, size]
    # x, x row stride, cos, sin, y, rows, heads, head size
    rope.argtypes = [pointer, size, pointer, pointer, pointer, size, size, size]
    swiglu.argtypes = [pointer, pointer, size, size]  # gate and up, y, rows, width
    norm.restype = rope.restype = swiglu.restype = ctypes.c_int
    return norm, rope, swiglu


def _float32_cpu(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dimension of a contiguous
    float32 ``x``, as a new contiguous tensor; None where the native kernel cannot."""
    functions = _functions()
    width = x.shape[-1] if x.dim() else 0
    if (
        functions is None
        or width == 0
        or not _float32_cpu(x, weight)
        or not x.is_contiguous()
        or not weight.is_contiguous()
        or weight.shape != (width,)
    ):
        return None
    out = torch.empty_like(x)
    rows = x.numel() // width
    status = functions[0](x.data_ptr(), width, weight.data_ptr(), eps, out.data_ptr(), rows, width)
    if status != 0:
        raise NativeKernelError(f"rms_norm refused its arguments ({status})")
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """``x * cos + rotate_half(x) * sin`` for ``x`` (1, N, heads, D) float32 whose
    heads lie contiguous in each row (a slice of the fused q/k/v product does),
    ``cos``/``sin`` (N, 1, D) contiguous: a new contiguous (1, N, heads, D) tensor,
    bit for bit torch's; None where the native kernel cannot."""
    functions = _functions()
    if functions is None or x.dim() != 4 or x.shape[0] != 1 or not _float32_cpu(x, cos, sin):
        return None
    rows, heads, head_dim = x.shape[1:]
    table = (rows, 1, head_dim)
    if (
        x.stride(3) != 1
        or x.stride(2) != head_dim
        or head_dim % 2
        or cos.shape != table
        or sin.shape != table
        or not cos.is_contiguous()
        or not sin.is_contiguous()
    ):
        return None
    out = torch.empty(x.shape, dtype=torch.float32)
    row_stride = x.stride(1) if rows > 1 else heads * head_dim
    pointers = (x.data_ptr(), row_stride, cos.data_ptr(), sin.data_ptr(), out.data_ptr())
    status = functions[1](*pointers, rows, heads, head_dim)
    if status != 0:
        raise NativeKernelError(f"rope refused its arguments ({status})")
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """``silu(gate) * up`` for ``gate_up`` (..., 2 I) contiguous float32, the gate's I
    columns then up's (the fused gate/up product): a new (..., I) tensor; None where
    the native kernel cannot."""
    functions = _functions()
    if (
        functions is None
        or gate_up.dim() == 0
        or gate_up.shape[-1] % 2
        or not _float32_cpu(gate_up)
        or not gate_up.is_contiguous()
    ):
        return None
    width = gate_up.shape[-1] // 2
    out = torch.empty((*gate_up.shape[:-1], width), dtype=torch.float32)
    rows = out.numel() // width if width else 0
    status = functions[2](gate_up.data_ptr(), out.data_ptr(), rows, width)
    if status != 0:
        raise NativeKernelError(f"silu_mul refused its arguments ({status})")
    return out
