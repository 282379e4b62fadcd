"""Laid-out weights live on 2 MiB pages where the system gives them, with the same values."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from teeshard.model import native
from teeshard.model.native import huge_pages

HUGE = huge_pages.HUGE_PAGE
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_available() -> bool:
    return sys.platform.startswith("linux") and THP.exists() and "[never]" not in THP.read_text()


def _anon_huge_kb(address: int) -> int:
    """AnonHugePages of the mapping that holds ``address``, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            low, high = (int(part, 16) for part in head.split("-"))
            inside = low <= address < high
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.fixture
def on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(huge_pages.HUGE_PAGES_ENV, raising=False)
    if not huge_pages.enabled():
        pytest.skip("no MADV_HUGEPAGE here")


def test_a_large_tensor_starts_on_a_huge_page_and_keeps_its_shape(on: None) -> None:
    t = huge_pages.empty((3 * 1024, 2048), torch.bfloat16)  # 12 MiB
    assert t.shape == (3 * 1024, 2048) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert t.data_ptr() % HUGE == 0


def _thp_fallbacks() -> int:
    """Huge-page faults the kernel served with small pages (no free 2 MiB block)."""
    for line in Path("/proc/vmstat").read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == "thp_fault_fallback":
            return int(value)
    return 0


@pytest.mark.skipif(not _thp_available(), reason="transparent huge pages are off here")
def test_a_written_weight_is_backed_by_huge_pages(on: None) -> None:
    """The property that makes decode faster: the kernel really mapped 2 MiB pages.
    (Advice given after the memory was touched, or on memory the allocator reused,
    would leave small pages without the kernel trying: this fails then.)"""
    fallbacks = _thp_fallbacks()
    t = huge_pages.empty((8 * HUGE,), torch.int8)
    t.fill_(1)
    huge_kb = _anon_huge_kb(t.data_ptr())
    if huge_kb < 8 * HUGE // 1024 and _thp_fallbacks() > fallbacks:
        pytest.skip("memory too fragmented for huge pages just now (thp_fault_fallback rose)")
    assert huge_kb == 8 * HUGE // 1024


@pytest.mark.skipif(not _thp_available(), reason="transparent huge pages are off here")
def test_turned_off_it_is_an_ordinary_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(huge_pages.HUGE_PAGES_ENV, "0")
    assert not huge_pages.enabled()
    t = huge_pages.empty((8 * HUGE,), torch.int8)
    t.fill_(1)
    assert _anon_huge_kb(t.data_ptr()) == 0  # "madvise" mode: nothing asked for them


def test_small_tensors_get_no_mapping_of_their_own(
    on: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under one huge page nothing is gained, and a mapping per small tensor would only
    multiply the process's mappings: those take the ordinary allocator."""

    def no_mapping(*args: object, **kwargs: object) -> None:
        raise AssertionError("a small tensor was given a mapping")

    monkeypatch.setattr(huge_pages.mmap, "mmap", no_mapping)
    small = huge_pages.empty((HUGE // 4 - 1,), torch.float32)
    assert small.shape == (HUGE // 4 - 1,) and small.dtype == torch.float32
    with pytest.raises(AssertionError, match="given a mapping"):  # the large one does map
        huge_pages.empty((HUGE // 4,), torch.float32)


def test_copy_keeps_every_value_of_a_strided_source(on: None) -> None:
    source = torch.randint(-128, 127, (4096, 1024), dtype=torch.int8)
    view = source.view(1024, 4, 64, 16).permute(0, 2, 1, 3)  # what block_weight copies
    copied = huge_pages.copy(view)
    assert copied.data_ptr() % HUGE == 0
    assert torch.equal(copied, view.contiguous())


def test_laid_out_weights_are_on_huge_pages_and_round_trip(on: None) -> None:
    q = torch.randint(-127, 128, (2048, 2048), dtype=torch.int8)  # 4 MiB
    for block in (native.FOUR_BY_SIXTEEN, (16, 4), (16, 2)):
        blocked = native.block_weight(q, block)
        assert blocked.data_ptr() % HUGE == 0
        assert torch.equal(native.unblock_weight(blocked, block), q)
