"""Offloading stand-ins for ``nn.Linear`` and ``nn.Embedding``, and the per-group runner.

A :class:`GroupRunner` turns one input of a group into its product, in the
node's mode:

    plain             y = accel(x)                                    float32
    verified          u = xq mod p;      z = accel(u); check(u, z);   y = lift(z)
    blinded           u = xq + r mod p;  z = accel(u);                y = lift(z - rW)
    blinded+verified  u = xq + r mod p;  z = accel(u); check(u, z);   y = lift(z - rW)

then dequantizes. The member modules (q/k/v, gate/up) are replaced by
:class:`OffloadedLinear` views of one runner: the first member called with an
input computes the whole group; the others, called with that same tensor, take
their slice. Nothing in the model code changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from teeshard.offload import field as gf
from teeshard.offload.client import AcceleratorClient
from teeshard.offload.freivalds import FreivaldsKey
from teeshard.offload.modes import OffloadMode
from teeshard.offload.pads import PadSource
from teeshard.offload.quant import QuantActivation, dequantize, quantize_activation

# Called with (group, xq, unblinded integer product) in tests, to assert exactness.
ProductObserver = Callable[[str, torch.Tensor, torch.Tensor], None]


@dataclass
class Scales:
    """What the node keeps of a quantized group: enough to quantize and dequantize."""

    weight: torch.Tensor  # (N,) float64 per-row weight scale
    act_bound: int


@dataclass
class GroupRunner:
    name: str
    widths: tuple[int, ...]
    mode: OffloadMode
    client: AcceleratorClient
    scales: Scales | None = None  # field arithmetic only
    pads: PadSource | None = None  # blinded modes
    key: FreivaldsKey | None = None  # verified modes
    observer: ProductObserver | None = None
    calls: int = 0
    _cached_x: torch.Tensor | None = field(default=None, repr=False)
    _cached_version: int = -1
    _parts: list[torch.Tensor] = field(default_factory=list, repr=False)
    _taken: set[int] = field(default_factory=set, repr=False)

    def member_output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        same_input = self._cached_x is x and self._cached_version == x._version
        if not same_input or index in self._taken:
            flat = x.reshape(-1, x.shape[-1])  # (B*T, K)
            product = self.product(flat).to(x.dtype)  # (B*T, N)
            self._parts = list(torch.split(product, list(self.widths), dim=1))
            self._cached_x, self._cached_version, self._taken = x, x._version, set()
        self._taken.add(index)
        out = self._parts[index]
        if len(self._taken) == len(self.widths):
            self._cached_x, self._parts = None, []
        return out.reshape(*x.shape[:-1], self.widths[index])

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """(T, K) activations to (T, N) products, as float64 (field) or float32 (plain)."""
        self.calls += 1
        if self.mode is OffloadMode.PLAIN:
            return self.client.matmul(self.name, x.to(torch.float32))
        assert self.scales is not None
        act: QuantActivation = quantize_activation(x, self.scales.act_bound)
        xq = gf.to_field(act.q)  # (T, K) residues
        factor: Callable[[], torch.Tensor] | None = None
        if self.mode.blinded:
            assert self.pads is not None
            r, factor = self.pads.take(self.name, xq.shape[0]).open()
            u = gf.add(xq, r)  # what leaves the TEE: uniform, independent of x
        else:
            u = xq
        z = self.client.matmul(self.name, u)  # (T, N) residues
        if self.key is not None and not self.key.holds(u, z):
            raise self.client.distrust(
                f"returned a wrong product for {self.name} (Freivalds check failed)"
            )
        y_field = gf.sub(z, factor()) if factor is not None else z
        product = gf.lift(y_field)  # exact integer xq @ Wq^T
        if self.observer is not None:
            self.observer(self.name, act.q, product)
        return dequantize(product, act, self.scales.weight)


class OffloadedLinear(nn.Module):
    """Member ``index`` of a group's product, plus the bias, which stays in the TEE."""

    def __init__(self, runner: GroupRunner, index: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.runner = runner
        self.index = index
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.out_features = runner.widths[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.runner.member_output(x, self.index)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"group={self.runner.name}, member={self.index}, mode={self.runner.mode.value}"


class OffloadedEmbedding(nn.Module):
    """Plain mode only: token ids go to the accelerator, which looks them up."""

    def __init__(self, client: AcceleratorClient, dtype: torch.dtype) -> None:
        super().__init__()
        self.client = client
        self.dtype = dtype

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        flat = self.client.embed([int(t) for t in token_ids.reshape(-1).tolist()])
        return flat.to(self.dtype).reshape(*token_ids.shape, flat.shape[-1])
