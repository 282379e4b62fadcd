"""Which matrices of a shard go to the accelerator, fused by the input they read.

q/k/v read the same normalised input, as do gate/up: each such set is one
*group*, sent once and multiplied by the stacked matrix, so a decode step costs
four round trips per layer (plus one for the LM head), not seven. Group names
use global layer indices, so a node and an accelerator serving the same range
agree on them: ``"3.attn_in"``, ``"3.attn_out"``, ``"3.mlp_in"``, ``"3.mlp_out"``,
``"lm_head"``; ``"embed"`` names the token embedding (plain mode only).

Biases (Qwen2's q/k/v) never leave the TEE: the node adds them after the product.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from teeshard.model.transformer import Shard

EMBED = "embed"
LM_HEAD = "lm_head"


@dataclass(frozen=True)
class Member:
    owner: nn.Module  # the module holding the linear
    attr: str  # its attribute name on ``owner``
    linear: nn.Linear


@dataclass(frozen=True)
class Group:
    name: str
    members: tuple[Member, ...]

    @property
    def in_features(self) -> int:
        return self.members[0].linear.in_features

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(m.linear.out_features for m in self.members)

    def stacked_weight(self) -> torch.Tensor:
        """(sum of widths, in_features), a fresh tensor."""
        return torch.cat([m.linear.weight.detach() for m in self.members], dim=0)


def shard_groups(shard: Shard) -> Iterator[Group]:
    """Every offloadable linear group of ``shard``, in forward order."""
    for index, block in enumerate(shard.layers):
        layer = shard.layer_range.start + index
        attn, mlp = block.self_attn, block.mlp
        yield Group(
            f"{layer}.attn_in",
            tuple(Member(attn, a, getattr(attn, a)) for a in ("q_proj", "k_proj", "v_proj")),
        )
        yield Group(f"{layer}.attn_out", (Member(attn, "o_proj", attn.o_proj),))
        yield Group(
            f"{layer}.mlp_in", tuple(Member(mlp, a, getattr(mlp, a)) for a in ("gate_proj", "up_proj"))
        )
        yield Group(f"{layer}.mlp_out", (Member(mlp, "down_proj", mlp.down_proj),))
    if shard.lm_head is not None:
        yield Group(LM_HEAD, (Member(shard, "lm_head", shard.lm_head),))


def release_weight(linear: nn.Module) -> None:
    """Drop a module's weight from memory once it lives elsewhere (keeps the bias)."""
    old = linear.weight
    linear.weight = nn.Parameter(torch.empty(0, dtype=old.dtype, device=old.device), requires_grad=False)
