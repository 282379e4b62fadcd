"""A preallocated key/value cache for one session on one shard."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class CacheFullError(ValueError):
    """A step would write past the session's maximum length."""


@dataclass
class KVCache:
    keys: torch.Tensor  # (L, B, Hkv, S, D): one slab so a session is one allocation
    values: torch.Tensor
    length: int = 0  # positions filled so far

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> KVCache:
        shape = (num_layers, 1, num_kv_heads, max_len, head_dim)
        # torch.empty touches no pages: memory grows with the tokens actually cached.
        return cls(
            torch.empty(shape, dtype=dtype, device=device),
            torch.empty(shape, dtype=dtype, device=device),
        )

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def check_room(self, steps: int) -> None:
        if self.length + steps > self.max_len:
            raise CacheFullError(
                f"session holds {self.length} of {self.max_len} positions; {steps} more do not fit"
            )

    def advance(self, steps: int) -> None:
        self.length += steps
