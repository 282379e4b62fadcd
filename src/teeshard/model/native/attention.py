"""Decode attention for a whole batch in one native call (``attention.c``).

A decoding session's attention is one query per head against its own cache: a
dozen small torch operators per session and layer (cache writes, casts, two
products, a softmax), each paying torch's dispatch. In a batch of decoding
sessions that per-session cost, not the arithmetic, is most of what a step spends
outside its linears, and it grows with every session while the linears' cost
hardly does. :func:`decode_attention` does every single-step segment of a batch in
one call per layer: it writes each session's new key and value into its cache
and computes its attention there, in float32, reading float32 or bfloat16 caches.

Where it cannot run (no native library, another dtype or device, a head size it
does not take) :func:`DecodeSessions.of` says so by returning None and
:class:`teeshard.model.transformer.Attention` keeps torch's path.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from teeshard.model.native import NativeKernelError, _build

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # what the kernel reads: 1 means bfloat16
MAX_HEAD_DIM = 256  # and a multiple of 8


class CacheSlab(Protocol):
    """What the kernel needs of a session's cache: its (L, 1, Hkv, S, D) slabs."""

    keys: torch.Tensor
    values: torch.Tensor


@functools.cache
def _function() -> Callable[..., int] | None:
    library = _build()[0]
    if library is None:
        return None
    function = library.teeshard_decode_attention
    function.restype = ctypes.c_int
    function.argtypes = (  # sessions, 5 arrays, layer, (tensor, row stride) x 3, out, ...
        [ctypes.c_int64] + [ctypes.c_void_p] * 5 + [ctypes.c_int64]
        + [ctypes.c_void_p, ctypes.c_int64] * 3 + [ctypes.c_void_p]
        + [ctypes.c_int64] * 4 + [ctypes.c_int] * 2
    )  # fmt: skip
    return function


def supports(dtype: torch.dtype, device: torch.device, head_dim: int) -> bool:
    """Whether the kernel computes decode attention for caches of this kind here."""
    return (
        dtype in _DTYPES
        and device.type == "cpu"
        and head_dim % 8 == 0
        and 0 < head_dim <= MAX_HEAD_DIM
        and _function() is not None
    )


@dataclass(frozen=True)
class DecodeSessions:
    """A batch's single-step segments, as the kernel takes them (built once per batch,
    used by every layer): which segments, their rows in the packed batch, their
    positions, and their caches' addresses and lengths; and what every one of those
    caches is (dtype, layers, key/value heads, head size) and how many rows the
    packed batch has, which :func:`decode_attention` holds each call to, since the
    kernel writes into the caches by those numbers."""

    segments: frozenset[int]
    rows: torch.Tensor  # int64 (S,)
    starts: torch.Tensor
    lengths: torch.Tensor
    k_bases: torch.Tensor
    v_bases: torch.Tensor
    caches: tuple[CacheSlab, ...]  # held so the addresses stay valid
    dtype: torch.dtype
    layers: int
    kv_heads: int
    head_dim: int
    batch_rows: int  # rows of the packed batch, decoding or not

    @classmethod
    def of(
        cls, caches: Sequence[CacheSlab], steps: Sequence[int], starts: Sequence[int]
    ) -> DecodeSessions | None:
        """The single-step segments of a batch, or None where there are none or the
        kernel does not take these caches."""
        first = caches[0].keys
        if first.dim() != 5 or not supports(first.dtype, first.device, first.shape[-1]):
            return None
        chosen, rows, offset = [], [], 0
        for index, (cache, count) in enumerate(zip(caches, steps, strict=True)):
            keys, values = cache.keys, cache.values
            fits = (  # the slab the kernel writes into is what it takes it for
                keys.dtype == values.dtype == first.dtype
                and keys.shape == values.shape
                and keys.dim() == 5
                and (keys.shape[:3], keys.shape[4]) == (first.shape[:3], first.shape[4])
                and keys.shape[1] == 1
                and keys.is_contiguous()
                and values.is_contiguous()
            )
            if count == 1 and fits:
                chosen.append(index)
                rows.append(offset)
            offset += count
        if not chosen:
            return None
        picked = [caches[i] for i in chosen]

        def longs(values: Sequence[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64)

        return cls(
            frozenset(chosen),
            longs(rows),
            longs([starts[i] for i in chosen]),
            longs([c.keys.shape[3] for c in picked]),
            longs([c.keys.data_ptr() for c in picked]),
            longs([c.values.data_ptr() for c in picked]),
            tuple(picked),
            first.dtype,
            first.shape[0],
            first.shape[2],
            first.shape[4],
            offset,
        )


def decode_attention(
    sessions: DecodeSessions,
    layer: int,
    q: torch.Tensor,  # (1, N, H, D) in the caches' dtype, rotated; heads and dims contiguous
    k: torch.Tensor,  # (1, N, Hkv, D)
    v: torch.Tensor,  # (1, N, Hkv, D)
    out: torch.Tensor,  # (1, N, H, D) contiguous: the sessions' rows are written
    window: int | None,
) -> None:
    """Write each of ``sessions``' new key and value into its cache at layer ``layer``
    and its attention output into ``out``'s rows (the other rows are left as they are)."""
    function = _function()
    heads, kv_heads, head_dim = q.shape[2], k.shape[2], q.shape[3]
    tensors = (q, k, v, out)
    if (
        function is None
        or any(t.dim() != 4 or t.shape[:2] != (1, sessions.batch_rows) for t in tensors)
        or any(t.dtype != sessions.dtype or t.shape[3] != sessions.head_dim for t in tensors)
        or any(t.stride(3) != 1 or t.stride(2) != head_dim for t in tensors)
        or (kv_heads, v.shape[2], out.shape[2]) != (sessions.kv_heads, kv_heads, heads)
        or heads % kv_heads != 0
    ):
        raise NativeKernelError("decode_attention: tensors the kernel does not take")
    if not out.is_contiguous():
        raise NativeKernelError("decode_attention: out must be contiguous")
    if not 0 <= layer < sessions.layers:
        raise NativeKernelError(
            f"decode_attention: layer {layer} of caches holding {sessions.layers}"
        )
    status = function(
        len(sessions.segments),
        sessions.rows.data_ptr(),
        sessions.starts.data_ptr(),
        sessions.lengths.data_ptr(),
        sessions.k_bases.data_ptr(),
        sessions.v_bases.data_ptr(),
        layer,
        q.data_ptr(), q.stride(1),
        k.data_ptr(), k.stride(1),
        v.data_ptr(), v.stride(1),
        out.data_ptr(),
        heads, kv_heads, head_dim,
        window or 0,
        _DTYPES[q.dtype],
        torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise NativeKernelError(f"decode_attention refused its arguments ({status})")
