"""One-time pads and their unblinding factors, made inside the TEE ahead of time.

A pad for one row of a group's input is ``r``, uniform in GF(p)^K from a CSPRNG;
its unblinding factor is ``r @ Wq^T mod p``. The node sends ``x + r`` and removes
``r @ Wq^T`` from the answer. Computing the factor costs exactly what the
accelerator's product costs, on the TEE's CPU: that is the price of blinding
without a second server, paid ahead of time by a background worker into a
bounded pool (``capacity_rows`` per group), or on demand when the pool runs dry.

Reuse is impossible by construction: a :class:`Pad` hands out its tensors once
(:meth:`Pad.open`) and drops its references; the pool gives each stored row to
exactly one pad and never keeps what it gave. Opening a pad twice raises
:class:`PadReuseError`.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from teeshard.offload import field as gf
from teeshard.offload.errors import PadReuseError
from teeshard.offload.quant import QuantWeight

log = logging.getLogger(__name__)
_serials = itertools.count(1)
PadObserver = Callable[[str, torch.Tensor], None]  # (group, r) for every pad opened


class Pad:
    """Pads for ``rows`` rows of one group, opened exactly once."""

    __slots__ = ("_factor", "_r", "group", "rows", "serial")

    def __init__(self, group: str, r: torch.Tensor, factor: Callable[[], torch.Tensor]) -> None:
        self.group = group
        self.rows = int(r.shape[0])
        self.serial = next(_serials)
        self._r: torch.Tensor | None = r
        self._factor: Callable[[], torch.Tensor] | None = factor

    def open(self) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
        """``(r, factor)``: the pad and a function giving ``r @ Wq^T mod p``; once only."""
        r, factor = self._r, self._factor
        if r is None or factor is None:
            raise PadReuseError(f"pad {self.serial} of {self.group} was already used")
        self._r = self._factor = None
        return r, factor


class PadSource(Protocol):
    def take(self, group: str, rows: int) -> Pad: ...

    def close(self) -> None: ...


@dataclass
class PadStats:
    rows_made: int = 0
    rows_used: int = 0
    rows_on_demand: int = 0  # made while a step waited: the pool was empty
    precompute_s: float = 0.0  # CPU seconds spent making pads, ahead of time or on demand
    on_demand_s: float = 0.0  # the part of precompute_s a step waited for


class PadPool:
    """Bounded per-group pools of precomputed pads, refilled by a background thread."""

    def __init__(
        self,
        weights: dict[str, QuantWeight],
        *,
        capacity_rows: int | Mapping[str, int] = 16,
        chunk_rows: int = 8,
        observer: PadObserver | None = None,
    ) -> None:
        capacities = (
            dict(capacity_rows) if isinstance(capacity_rows, Mapping)
            else dict.fromkeys(weights, capacity_rows)
        )  # fmt: skip
        if any(c < 0 for c in capacities.values()) or chunk_rows < 1:
            raise ValueError("pad pool capacity must be >= 0 and chunks >= 1 row")
        self.weights = weights
        self._capacity = {name: capacities.get(name, 0) for name in weights}
        self.chunk_rows = chunk_rows
        self.observer = observer
        self.stats = PadStats()
        self._pools: dict[str, deque[tuple[torch.Tensor, torch.Tensor]]] = {
            name: deque() for name in weights
        }
        self._rows: dict[str, int] = dict.fromkeys(weights, 0)
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None

    def make(self, group: str, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh pads and factors for ``rows`` rows (pure compute, no bookkeeping)."""
        weight = self.weights[group]
        r = gf.random_elements((rows, weight.in_features))
        return r, gf.matmul(r, weight.q_t)

    def take(self, group: str, rows: int) -> Pad:
        if group not in self.weights:
            raise KeyError(f"no pads for group {group!r}")
        parts_r: list[torch.Tensor] = []
        parts_f: list[torch.Tensor] = []
        need = rows
        with self._cond:
            pool = self._pools[group]
            while need and pool:
                r, f = pool.popleft()
                if r.shape[0] > need:  # split: the rest stays, disjoint rows
                    pool.appendleft((r[need:], f[need:]))
                    r, f = r[:need], f[:need]
                parts_r.append(r)
                parts_f.append(f)
                need -= r.shape[0]
                self._rows[group] -= r.shape[0]
            self._cond.notify_all()
        if need:
            start = time.perf_counter()
            r, f = self.make(group, need)
            spent = time.perf_counter() - start
            with self._cond:
                self.stats.rows_made += need
                self.stats.rows_on_demand += need
                self.stats.precompute_s += spent
                self.stats.on_demand_s += spent
            parts_r.append(r)
            parts_f.append(f)
        self.stats.rows_used += rows
        pad_r = torch.cat(parts_r) if len(parts_r) > 1 else parts_r[0]
        pad_f = torch.cat(parts_f) if len(parts_f) > 1 else parts_f[0]
        if self.observer is not None:
            self.observer(group, pad_r)
        return Pad(group, pad_r, lambda: pad_f)

    def fill(self) -> float:
        """Fill every group to capacity now (no worker); returns the seconds it took."""
        start = time.perf_counter()
        while (group := self._neediest()) is not None:
            self._refill(group)
        return time.perf_counter() - start

    def capacity(self, group: str) -> int:
        return self._capacity[group]

    def start(self) -> None:
        if self._worker is None and any(self._capacity.values()):
            self._worker = threading.Thread(target=self._run, name="pad-pool", daemon=True)
            self._worker.start()

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.join(timeout=30)
            self._worker = None
        with self._cond:
            for pool in self._pools.values():
                pool.clear()

    def available_rows(self, group: str) -> int:
        with self._cond:
            return self._rows[group]

    # -- internals --

    def _neediest(self) -> str | None:
        """The group with the smallest share of its capacity ready, or None when all are full."""
        with self._cond:
            short = {
                g: n / self._capacity[g] for g, n in self._rows.items() if n < self._capacity[g]
            }
            return min(short, key=short.__getitem__, default=None)

    def _refill(self, group: str) -> None:
        rows = min(self.chunk_rows, self._capacity[group] - self.available_rows(group))
        if rows <= 0:
            return
        start = time.perf_counter()
        r, f = self.make(group, rows)
        spent = time.perf_counter() - start
        with self._cond:
            self._pools[group].append((r, f))
            self._rows[group] += rows
            self.stats.rows_made += rows
            self.stats.precompute_s += spent

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                group = self._neediest()
                if group is None:
                    with self._cond:
                        self._cond.wait(timeout=1.0)
                    continue
                self._refill(group)
        except Exception:  # pragma: no cover - a crashed worker only means on-demand pads
            log.exception("pad worker stopped; pads are now made on demand")
