"""The two-server variant of blinding: no pad precomputation in the TEE.

For each input the node draws a fresh pad ``r`` and sends ``x + r`` to
accelerator A and ``r`` to accelerator B, both at once; A returns
``(x + r) Wq^T``, B returns ``r Wq^T``, and their difference is ``x Wq^T``. Each
server on its own sees a uniform field element, independent of x; together they
learn x. The assumption: **A and B do not collude** (different operators, no
shared host). In verified mode B's answer is checked like A's, with the same
secret Freivalds vectors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from teeshard.offload import field as gf
from teeshard.offload.client import AcceleratorClient
from teeshard.offload.freivalds import FreivaldsKey
from teeshard.offload.pads import Pad, PadObserver


class TwoServerPads:
    """A :class:`~teeshard.offload.pads.PadSource` whose factors come from server B."""

    def __init__(
        self,
        server_b: AcceleratorClient,
        keys: dict[str, FreivaldsKey] | None = None,
        observer: PadObserver | None = None,
    ) -> None:
        self.server_b = server_b
        self.keys = keys
        self.observer = observer
        self.rows_used = 0

    def take(self, group: str, rows: int) -> Pad:
        _, inner = self.server_b.group_shape(group)
        r = gf.random_elements((rows, inner))
        receive = self.server_b.start_matmul(group, r)  # B works while A does
        if self.observer is not None:
            self.observer(group, r)
        self.rows_used += rows
        return Pad(group, r, self._checked(group, r, receive))

    def _checked(
        self, group: str, r: torch.Tensor, receive: Callable[[], torch.Tensor]
    ) -> Callable[[], torch.Tensor]:
        def factor() -> torch.Tensor:
            f = receive()
            key = self.keys.get(group) if self.keys is not None else None
            if key is not None and not key.holds(r, f):
                raise self.server_b.distrust(
                    f"returned a wrong pad product for {group} (Freivalds check failed)"
                )
            return f

        return factor

    def close(self) -> None:
        pass
