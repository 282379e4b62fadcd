"""How each native kernel lays out its weight: blocks of channels by inputs, made once at
load (on 2 MiB pages where Linux gives them: :mod:`teeshard.model.native.huge_pages`),
so that a kernel's pass reads one sequential stream. The bytes are the weight's own,
only reordered; :func:`stored_weight` gives them back as stored."""

from __future__ import annotations

import torch

from teeshard.model.native import huge_pages

Block = tuple[int, int]  # (channels, inputs) of one block of a blocked weight
FOUR_BY_SIXTEEN: Block = (4, 16)  # what every kernel reads but one
# those that read 16 channels a 64-byte line: int8, bfloat16 and float32 elements
_WEIGHT_BLOCKS: dict[str, Block] = {
    "avx512vnni": (16, 4),  # int8
    "avx512bf16": (16, 2),  # bfloat16
    "avx512f": (16, 1),  # float32
}


def weight_block(isa: str | None) -> Block | None:
    """The block of the layout the ``isa`` kernel reads its weight in (None: as stored)."""
    return None if isa is None else _WEIGHT_BLOCKS.get(isa, FOUR_BY_SIXTEEN)


def block_weight(q: torch.Tensor, block: Block = FOUR_BY_SIXTEEN) -> torch.Tensor:
    """A weight (N, K) as stored -> the same values reordered for the native kernels:
    ``[n / c][k / i][n % c][k % i]`` for ``block`` (c, i), still shaped (N, K). Four
    channels by 16 inputs by default: one 64-byte line of an int8 weight each."""
    (n, k), (c, i) = q.shape, block
    # on huge pages: the kernels stream this every decode step (native/huge_pages.py)
    return huge_pages.copy(q.view(n // c, c, k // i, i).permute(0, 2, 1, 3)).view(n, k)


def unblock_weight(blocked: torch.Tensor, block: Block = FOUR_BY_SIXTEEN) -> torch.Tensor:
    """The inverse of :func:`block_weight`."""
    (n, k), (c, i) = blocked.shape, block
    return blocked.view(n // c, k // i, c, i).permute(0, 2, 1, 3).contiguous().view(n, k)


def lay_out_weight(q: torch.Tensor, isa: str | None) -> torch.Tensor:
    """A weight (N, K) as stored -> the layout the ``isa`` kernel reads (None: as stored,
    for torch's kernels)."""
    block = weight_block(isa)
    return q if block is None else block_weight(q, block)


def stored_weight(laid_out: torch.Tensor, isa: str | None) -> torch.Tensor:
    """The inverse of :func:`lay_out_weight`."""
    block = weight_block(isa)
    return laid_out if block is None else unblock_weight(laid_out, block)
