"""One-time pads: each opened once, factors exact, the pool bounded and refilled."""

from __future__ import annotations

import time

import pytest
import torch

from teeshard.offload import field as gf
from teeshard.offload.errors import PadReuseError
from teeshard.offload.pads import PadPool
from teeshard.offload.quant import quantize_weight


@pytest.fixture()
def weights() -> dict[str, object]:
    torch.manual_seed(0)
    return {"a": quantize_weight(torch.randn(24, 40)), "b": quantize_weight(torch.randn(8, 24))}


def test_a_pad_opens_once(weights: dict) -> None:
    pool = PadPool(weights, capacity_rows=4)
    pad = pool.take("a", 2)
    r, _factor = pad.open()
    assert r.shape == (2, 40)
    with pytest.raises(PadReuseError):
        pad.open()


def test_factors_unblind_exactly(weights: dict) -> None:
    pool = PadPool(weights, capacity_rows=6, chunk_rows=4)
    pool.fill()
    xq = torch.randint(-1000, 1000, (5, 40))
    r, factor = pool.take("a", 5).open()  # 4 + 1 rows from two chunks... and a split
    u = gf.add(gf.to_field(xq), r)
    z = gf.matmul(u, weights["a"].q_t)  # what an honest accelerator returns
    product = gf.lift(gf.sub(z, factor()))
    reference = gf.lift(gf.matmul(gf.to_field(xq), weights["a"].q_t))
    assert torch.equal(product, reference)


def test_pool_never_hands_out_a_row_twice(weights: dict) -> None:
    seen: list[bytes] = []
    pool = PadPool(
        weights,
        capacity_rows=8,
        chunk_rows=3,
        observer=lambda g, r: seen.extend(row.numpy().tobytes() for row in r),
    )
    pool.fill()
    for rows in (1, 2, 5, 7, 8, 3, 1, 16):  # splits chunks, drains, goes on demand
        pool.take("a", rows).open()
    assert len(seen) == 43
    assert len(set(seen)) == len(seen)
    assert pool.stats.rows_on_demand > 0 and pool.stats.rows_used == 43


def test_background_worker_fills_to_capacity_only(weights: dict) -> None:
    pool = PadPool(weights, capacity_rows=10, chunk_rows=4)
    pool.start()
    try:
        deadline = time.monotonic() + 20
        while pool.available_rows("a") < 10 or pool.available_rows("b") < 10:
            assert time.monotonic() < deadline, "worker did not fill the pool"
            time.sleep(0.01)
        time.sleep(0.2)
        assert pool.available_rows("a") == 10 and pool.available_rows("b") == 10  # bounded
        pool.take("a", 6).open()
        deadline = time.monotonic() + 20
        while pool.available_rows("a") < 10:
            assert time.monotonic() < deadline, "worker did not refill"
            time.sleep(0.01)
        assert pool.stats.rows_on_demand == 0
        assert pool.stats.precompute_s > 0
    finally:
        pool.close()
