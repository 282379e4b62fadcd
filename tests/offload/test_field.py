"""Exact field arithmetic and quantization that cannot wrap: pure functions, no I/O."""

from __future__ import annotations

import random

import pytest
import torch

from teeshard.offload import field as gf
from teeshard.offload import quant


def python_matmul(a: torch.Tensor, w: torch.Tensor) -> list[list[int]]:
    rows, cols = a.tolist(), w.t().tolist()
    return [
        [sum(int(x) * int(y) for x, y in zip(r, c, strict=True)) % gf.P for c in cols] for r in rows
    ]


def test_matmul_is_exact_across_chunks() -> None:
    inner = gf.chunk_size(gf.WEIGHT_BITS) * 2 + 123  # three chunks
    a = gf.random_elements((3, inner))
    w = torch.randint(-gf.WEIGHT_MAX, gf.WEIGHT_MAX + 1, (inner, 4)).to(torch.float32)
    w[:, 0] = gf.WEIGHT_MAX  # worst case: every product at its largest
    a[0] = gf.P - 1
    assert gf.matmul(a, w).tolist() == python_matmul(a, w)


def test_matmul_field_is_exact() -> None:
    a, b = gf.random_elements((2, 3000)), gf.random_elements((3000, 3))
    assert gf.matmul_field(a, b).tolist() == python_matmul(a, b)


def test_chunks_are_needed() -> None:
    """A float64 dot product past the chunk size loses integers: the chunking is not decoration."""
    inner = gf.chunk_size(gf.WEIGHT_BITS) * 4
    a = torch.full((1, inner), float(gf.LIMB_MASK), dtype=torch.float64)
    w = torch.full((inner, 1), float(gf.WEIGHT_MAX), dtype=torch.float64)
    a[0, -1] = gf.LIMB_MASK - 1
    exact = (inner - 1) * gf.LIMB_MASK * gf.WEIGHT_MAX + (gf.LIMB_MASK - 1) * gf.WEIGHT_MAX
    assert int((a @ w).item()) != exact


def test_mul_pow2_and_lift() -> None:
    values = gf.random_elements((1000,))
    for shift in (0, 1, 21, 42, 60):
        expected = [(int(v) << shift) % gf.P for v in values]
        assert gf.mul_pow2(values, shift).tolist() == expected
    signed = torch.tensor([-gf.HALF, -1, 0, 1, gf.HALF])
    assert gf.lift(gf.to_field(signed)).tolist() == signed.tolist()


def test_random_elements_are_residues_and_fresh() -> None:
    a, b = gf.random_elements((50_000,)), gf.random_elements((50_000,))
    assert int(a.min()) >= 0 and int(a.max()) < gf.P
    assert not torch.equal(a, b)
    # top bit of a 61-bit uniform value is set half the time
    assert abs(float(((a >> 60) & 1).float().mean()) - 0.5) < 0.02


def test_worst_case_activation_does_not_wrap() -> None:
    """The adversarial input: every |x| at its bound with the signs of the widest row."""
    torch.manual_seed(0)
    weight = torch.randn(16, 600) * 0.05
    qw = quant.quantize_weight(weight)
    widest = int(qw.q.abs().sum(dim=1).argmax())
    x = torch.sign(qw.q[widest]).to(torch.float64)[None, :]  # (1, K)
    act = quant.quantize_activation(x, qw.act_bound)
    exact = sum(
        int(a) * int(w) for a, w in zip(act.q[0].tolist(), qw.q[widest].tolist(), strict=True)
    )
    assert abs(exact) <= gf.HALF
    assert int(quant.integer_product(act, qw)[0, widest]) == exact
    # twice the bound would wrap: the lift then returns a different integer
    doubled = quant.QuantActivation(act.q * 2, act.step / 2)
    wrapped = int(quant.integer_product(doubled, qw)[0, widest])
    if abs(2 * exact) > gf.HALF:
        assert wrapped != 2 * exact


@pytest.mark.parametrize("shape", [(4, 64, 160), (3, 2048, 256)])
def test_quantized_product_within_stated_bound(shape: tuple[int, int, int]) -> None:
    rows, inner, out = shape
    torch.manual_seed(1)
    x = torch.randn(rows, inner) * random.choice([0.1, 3.0])
    x[0, 0] = 40.0  # an outlier activation
    weight = torch.randn(out, inner) * 0.02
    qw = quant.quantize_weight(weight)
    act = quant.quantize_activation(x, qw.act_bound)
    y = quant.dequantize(quant.integer_product(act, qw), act, qw.scale)
    err = (y - x.double() @ weight.double().t()).abs()
    assert bool((err <= quant.error_bound(x, weight, qw) + 1e-12).all())
    assert float(err.max()) < 1e-4
