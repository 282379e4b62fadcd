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

from teeshard.model.transformer import MLP, Attention, Block, Shard
from teeshard.offload.errors import OffloadConfigError

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
        assert isinstance(block, Block)
        attn, mlp = block.self_attn, block.mlp
        assert isinstance(attn, Attention) and isinstance(mlp, MLP)
        yield _group(f"{layer}.attn_in", attn, ("q_proj", "k_proj", "v_proj"))
        yield _group(f"{layer}.attn_out", attn, ("o_proj",))
        yield _group(f"{layer}.mlp_in", mlp, ("gate_proj", "up_proj"))
        yield _group(f"{layer}.mlp_out", mlp, ("down_proj",))
    if shard.lm_head is not None:
        yield _group(LM_HEAD, shard, ("lm_head",))


def _group(name: str, owner: nn.Module, attrs: tuple[str, ...]) -> Group:
    members = []
    for attr in attrs:
        linear = getattr(owner, attr)
        if not isinstance(linear, nn.Linear):
            raise OffloadConfigError(f"{name}: {attr} is not a plain Linear (offloaded already?)")
        members.append(Member(owner, attr, linear))
    return Group(name, tuple(members))


def release_weight(linear: nn.Linear | nn.Embedding) -> None:
    """Drop a module's weight from memory once it lives elsewhere (keeps the bias)."""
    old = linear.weight
    linear.weight = nn.Parameter(
        torch.empty(0, dtype=old.dtype, device=old.device), requires_grad=False
    )
