"""A Merkle tree of (account, cumulative amount) leaves, as ``TokenLedger.claim`` checks it.

Pure functions, no I/O. The contract computes, for a claim:

- leaf   = keccak256(0x00 || abi.encode(contract, account, amount))  (97 bytes)
- parent = keccak256(min(a, b) || max(a, b))  (sorted pair: a proof needs no
  left/right flags), compared as 256-bit integers.

A leaf's preimage is 97 bytes and an inner node's 64, so no inner node can be
passed off as a leaf (the second-preimage forgery). Naming the contract in the
leaf keeps a proof for one deployment from being replayed on another. A level
with an odd node out promotes it unchanged. Leaves are sorted, so the same
amounts always give the same root.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from eth_abi import encode
from eth_utils import keccak, to_checksum_address

MAX_DEPTH = 32  # the contract's bound on a proof's length


def leaf_hash(contract: str, account: str, amount: int) -> bytes:
    body = encode(
        ["address", "address", "uint256"],
        [to_checksum_address(contract), to_checksum_address(account), amount],
    )
    return keccak(b"\x00" + body)


def parent_hash(a: bytes, b: bytes) -> bytes:
    return keccak(a + b) if a < b else keccak(b + a)  # big-endian bytes order as integers


def root_of(leaf: bytes, proof: Sequence[bytes]) -> bytes:
    node = leaf
    for sibling in proof:
        node = parent_hash(node, sibling)
    return node


@dataclass(frozen=True)
class MerkleTree:
    """The levels of the tree, leaves first; ``levels[-1][0]`` is the root."""

    levels: tuple[tuple[bytes, ...], ...]

    @classmethod
    def build(cls, leaves: Sequence[bytes]) -> MerkleTree:
        if not leaves:
            raise ValueError("a Merkle tree needs at least one leaf")
        level = tuple(sorted(leaves))
        levels = [level]
        while len(level) > 1:
            pairs = [parent_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
            if len(level) % 2:
                pairs.append(level[-1])
            level = tuple(pairs)
            levels.append(level)
        if len(levels) - 1 > MAX_DEPTH:
            raise ValueError(f"more than 2**{MAX_DEPTH} leaves")
        return cls(tuple(levels))

    @property
    def root(self) -> bytes:
        return self.levels[-1][0]

    def proof(self, leaf: bytes) -> list[bytes]:
        try:
            index = self.levels[0].index(leaf)
        except ValueError:
            raise KeyError("this leaf is not in the tree") from None
        proof = []
        for level in self.levels[:-1]:
            sibling = index ^ 1
            if sibling < len(level):
                proof.append(level[sibling])
            index //= 2
        return proof


def verify(root: bytes, leaf: bytes, proof: Sequence[bytes]) -> bool:
    return root_of(leaf, proof) == root


def tree_of(contract: str, amounts: Mapping[str, int]) -> MerkleTree:
    """The tree of ``account -> cumulative amount`` for the ledger at ``contract``."""
    return MerkleTree.build([leaf_hash(contract, a, n) for a, n in amounts.items()])
