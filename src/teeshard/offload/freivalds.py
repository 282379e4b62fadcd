"""Freivalds' check of a returned product, against secret vectors fixed at load.

For a group with quantized weights Wq (N, K) the node draws, once, a secret
``s`` of :data:`VECTORS` columns with entries uniform in [0, 2^20) from a CSPRNG and
keeps ``t = Wq^T s mod p`` (K values per column). An answer ``z`` to the input
``u`` is accepted only if ``z s == u t (mod p)``: a cost of O(T (N + K)) against the
product's O(T N K).

Soundness: if ``z != u Wq^T`` some row ``d`` of the difference is nonzero, and
``d . s = 0`` holds for at most one value of each entry of ``s`` given the others
(p is prime and 2^20 < p), so one column misses with probability at most 2^-20 and
all three with at most 2^-60, whatever the accelerator chose, as long as it does
not know ``s``. It learns nothing about ``s`` from answers that pass, and the node
stops using it at the first failure, so it gets no second guess.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from teeshard.offload import field as gf
from teeshard.offload.quant import QuantWeight

VECTORS = 3
SECRET_BITS = 20
MISS_PROBABILITY_LOG2 = -SECRET_BITS * VECTORS  # at most 2^-60 per check


@dataclass(frozen=True)
class FreivaldsKey:
    s: torch.Tensor  # (N, VECTORS) float64 integers in [0, 2^20): secret
    t: torch.Tensor  # (K, VECTORS) int64 residues: Wq^T s mod p

    @classmethod
    def derive(cls, weight: QuantWeight) -> FreivaldsKey:
        s = gf.random_small((weight.out_features, VECTORS), SECRET_BITS)  # (N, k)
        t = gf.matmul(s.t().contiguous(), weight.q, gf.WEIGHT_BITS)  # (k, N) @ (N, K) -> (k, K)
        return cls(s.to(torch.float64), t.t().contiguous())

    def holds(self, u: torch.Tensor, z: torch.Tensor) -> bool:
        """Whether ``z == u @ Wq^T (mod p)`` passes the check; u (T, K), z (T, N) residues."""
        lhs = gf.matmul(z, self.s, SECRET_BITS)  # (T, k)
        rhs = gf.matmul_field(u, self.t)  # (T, k)
        return torch.equal(lhs, rhs)
