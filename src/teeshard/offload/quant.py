"""Fixed-point quantization into the field, with a guarantee that nothing wraps around.

Weights: each output row ``j`` of a matrix W (N, K) gets its own scale
``s_j = max|W_j| / (2^19 - 1)`` and ``Wq = round(W / s)``, a signed 20-bit integer
(stored in float32, which holds it exactly). Rounding moves a weight by at most
``s_j / 2``: about 1e-6 of the row's largest weight.

Activations: each row ``i`` of x (T, K) is scaled so that its largest entry maps
to ``B = floor(HALF / L1)``, where ``L1 = max_j sum_k |Wq[j, k]|`` is fixed per
matrix. Then for every output ``|sum_k xq[i, k] Wq[j, k]| <= B * L1 <= HALF``:
the integer product, taken modulo p and lifted back to [-HALF, HALF], is the
exact integer product. This is a worst-case bound, so it never fails. For the
TinyLlama shapes B is about 2^33: an activation moves by at most
``max|x_i| / (2B)`` (about 1e-10 of the row's largest entry).

Error bound of one output (float arithmetic aside):
``|y_ij - yhat_ij| <= ||x_i||_1 * s_j / 2 + ||W_j||_1 * max|x_i| / (2B) + (their product)``,
which :func:`error_bound` computes; the tests check measured errors against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from teeshard.offload import field


@dataclass(frozen=True)
class QuantWeight:
    """One matrix in fixed point. ``q``: (N, K) integer-valued float32; ``scale``: (N,)."""

    q: torch.Tensor
    scale: torch.Tensor  # float64, per output row
    l1_max: int  # max_j sum_k |q[j, k]|
    act_bound: int  # B: the largest |x_q| an activation may take

    @property
    def out_features(self) -> int:
        return int(self.q.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.q.shape[1])

    @property
    def q_t(self) -> torch.Tensor:
        """(K, N) view for ``x @ W^T`` products."""
        return self.q.t()


def quantize_weight(weight: torch.Tensor) -> QuantWeight:
    """Quantize a float (N, K) matrix; raises if it is so wide that no bound remains."""
    w = weight.detach().to(torch.float64)
    peak = w.abs().amax(dim=1)  # (N,)
    scale = torch.where(peak > 0, peak / field.WEIGHT_MAX, torch.ones_like(peak))
    q = torch.round(w / scale[:, None]).clamp_(-field.WEIGHT_MAX, field.WEIGHT_MAX)
    l1_max = int(q.abs().sum(dim=1).max().item()) if q.numel() else 0
    act_bound = field.HALF // max(l1_max, 1)
    if act_bound < 1 << 16:
        raise ValueError(f"matrix of {q.shape[1]} inputs is too wide for exact field products")
    return QuantWeight(q.to(torch.float32), scale, l1_max, act_bound)


def stack(weights: list[QuantWeight]) -> QuantWeight:
    """Fuse matrices that read the same input (q/k/v, gate/up) into one."""
    q = torch.cat([w.q for w in weights], dim=0)
    l1_max = max(w.l1_max for w in weights)
    return QuantWeight(
        q, torch.cat([w.scale for w in weights]), l1_max, field.HALF // max(l1_max, 1)
    )


@dataclass(frozen=True)
class QuantActivation:
    """Rows of x in fixed point: ``x ~= q * step[:, None]``."""

    q: torch.Tensor  # (T, K) int64, |q| <= act_bound
    step: torch.Tensor  # (T,) float64: the value of one unit in each row


def quantize_activation(x: torch.Tensor, act_bound: int) -> QuantActivation:
    x64 = x.detach().to(torch.float64)  # (T, K)
    peak = x64.abs().amax(dim=1)  # (T,)
    step = torch.where(peak > 0, peak / act_bound, torch.ones_like(peak))
    q = torch.round(x64 / step[:, None]).clamp_(-act_bound, act_bound)
    return QuantActivation(q.to(torch.int64), step)


def dequantize(
    product: torch.Tensor, act: QuantActivation, weight_scale: torch.Tensor
) -> torch.Tensor:
    """Lifted integer products (T, N) back to float64 values."""
    return product.to(torch.float64) * act.step[:, None] * weight_scale[None, :]


def integer_product(act: QuantActivation, weight: QuantWeight) -> torch.Tensor:
    """The plain integer product ``xq @ Wq^T`` computed exactly (reference for tests)."""
    return field.lift(field.matmul(field.to_field(act.q), weight.q_t))


def error_bound(x: torch.Tensor, weight: torch.Tensor, quant: QuantWeight) -> torch.Tensor:
    """Worst-case |x W^T - dequantized product| per output, (T, N), from quantization alone."""
    x64 = x.detach().to(torch.float64)
    w64 = weight.detach().to(torch.float64)
    dw = quant.scale / 2  # (N,)
    dx = x64.abs().amax(dim=1) / quant.act_bound / 2  # (T,)
    l1_x = x64.abs().sum(dim=1)  # (T,)
    l1_w = w64.abs().sum(dim=1)  # (N,)
    k = x64.shape[1]
    return l1_x[:, None] * dw[None, :] + dx[:, None] * l1_w[None, :] + k * dx[:, None] * dw[None, :]
