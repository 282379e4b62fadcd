"""Weights on 2 MiB pages: fewer TLB misses while a decode step streams them.

Decode reads every weight of the shard once a step, so the product runs at the
speed memory delivers. On 4 KiB pages the stream crosses a page (a TLB miss, and
a page walk) every 64 cache lines; on transparent huge pages, every 32768. On the
2-core AMD EPYC Zen 4 here, a forward of 11 TinyLlama layers at one row took 23.5-25.2
ms instead of 31.6-33.1 in w8a8, and 27.5-27.9 instead of 33.6-33.9 in int8 (README
"Throughput").

Linux gives an anonymous mapping huge pages when the region is 2 MiB aligned and
advised with ``madvise(MADV_HUGEPAGE)`` before it is touched (with
``/sys/kernel/mm/transparent_hugepage/enabled`` at ``madvise`` or ``always``). So a
weight is laid out into a fresh anonymous mapping with 2 MiB of slack: the aligned part
is advised (its whole huge pages: the tail of the last one stays on small pages, so
none is wasted), then written; the slack is never touched and costs no memory. Where the
kernel refuses or it is not Linux, the tensor is an ordinary one: only speed differs.

``TEESHARD_HUGE_PAGES=0`` turns this off (for comparison).
"""

from __future__ import annotations

import logging
import math
import mmap
import os

import torch

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
HUGE_PAGES_ENV = "TEESHARD_HUGE_PAGES"  # "0": ordinary pages


def enabled() -> bool:
    return os.environ.get(HUGE_PAGES_ENV, "1") != "0" and hasattr(mmap, "MADV_HUGEPAGE")


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor, on huge pages where the system gives them
    (only tensors of at least one huge page: smaller ones gain nothing)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < HUGE_PAGE or not enabled():
        return torch.empty(shape, dtype=dtype)
    # A fresh anonymous mapping, not the allocator's: memory it reuses is already backed
    # by small pages, which advice no longer changes.
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(region, dtype=torch.uint8)  # holds the mapping while it lives
    start = -raw.data_ptr() % HUGE_PAGE
    whole = nbytes // HUGE_PAGE * HUGE_PAGE  # a partial last page would waste its rest
    try:
        region.madvise(mmap.MADV_HUGEPAGE, start, whole)
    except OSError as exc:  # THP compiled out or refused: ordinary pages, same values
        log.debug("madvise(MADV_HUGEPAGE) refused: %s", exc)
    return raw[start : start + nbytes].view(dtype).view(shape)


def copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of the CPU ``tensor`` on huge pages (see :func:`empty`)."""
    out = empty(tuple(tensor.shape), tensor.dtype)
    out.copy_(tensor)
    return out
