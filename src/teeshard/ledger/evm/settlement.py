"""Epoch settlement: per-request charging off chain, one root on chain per epoch.

The recommended way to run the ledger on chain. Users put tokens in the
contract's escrow (``deposit_escrow``: deposits stay on chain); the SQL ledger
charges every request (no transaction, no block to wait for, no per-user usage
in a public log); at the end of each epoch the settler posts the Merkle root of
the cumulative amount payable to each account (operators' earnings, and users'
refunds of what they did not spend) with its total, which the contract checks
against the escrow; anyone then claims an account's amount with its proof, and
the account withdraws the ETH (``withdraw``). Amounts are cumulative, so a
claim is idempotent and a missed epoch is caught up by the next one.

``accumulate`` and ``build_epoch`` are pure; ``EpochSettler`` does the I/O: it
keeps every posted epoch's amounts (so proofs can be handed out) in memory or
in a directory of JSON files, written before the root is posted so that a crash
in between loses nothing (``recover_pending``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_utils import is_address, to_checksum_address

from teeshard.ledger.evm.contract import ContractClient
from teeshard.ledger.evm.events import logs
from teeshard.ledger.evm.merkle import leaf_hash, tree_of
from teeshard.ledger.interface import InsufficientBalance, InvalidAmount, UnknownAccount


@dataclass(frozen=True)
class Claim:
    """What ``TokenLedger.claim`` takes: one account's cumulative amount and its proof."""

    epoch: int
    account: str
    amount: int
    proof: tuple[bytes, ...]


@dataclass(frozen=True)
class Epoch:
    """One settlement: the cumulative amount payable per account, and its root."""

    contract: str
    amounts: Mapping[str, int]  # checksummed address -> cumulative tokens
    root: bytes
    total: int
    number: int | None = None  # the contract's epoch number, once posted

    def claim(self, account: str) -> Claim:
        if self.number is None:
            raise ValueError("this epoch is not posted yet")
        address = to_checksum_address(account)
        if address not in self.amounts:
            raise UnknownAccount(f"{address} has nothing in settlement epoch {self.number}")
        amount = self.amounts[address]
        proof = tree_of(self.contract, self.amounts).proof(
            leaf_hash(self.contract, address, amount)
        )
        return Claim(self.number, address, amount, tuple(proof))

    def to_json(self) -> str:
        return json.dumps(
            {
                "contract": self.contract,
                "number": self.number,
                "root": "0x" + self.root.hex(),
                "total": self.total,
                "amounts": dict(sorted(self.amounts.items())),
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> Epoch:
        data: dict[str, Any] = json.loads(text)
        epoch = build_epoch(data["contract"], data["amounts"], data["number"])
        if "0x" + epoch.root.hex() != data["root"]:
            raise ValueError("the stored settlement epoch does not hash to its root")
        return epoch


def accumulate(previous: Mapping[str, int], earned: Mapping[str, int]) -> dict[str, int]:
    """The cumulative amounts after an epoch in which ``earned`` came due (both as given)."""
    out = {to_checksum_address(a): int(n) for a, n in previous.items()}
    for account, amount in earned.items():
        if not is_address(account):
            raise UnknownAccount(f"{account!r} is not a wallet address")
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
            raise InvalidAmount(f"the amount for {account} must be a whole number, got {amount!r}")
        address = to_checksum_address(account)
        out[address] = out.get(address, 0) + amount
    return {a: n for a, n in out.items() if n > 0}


def build_epoch(contract: str, cumulative: Mapping[str, int], number: int | None = None) -> Epoch:
    amounts = {str(to_checksum_address(a)): int(n) for a, n in cumulative.items() if int(n) > 0}
    if not amounts:
        raise InvalidAmount("an epoch needs at least one account with an amount")
    if any(n >= 2**256 for n in amounts.values()):
        raise InvalidAmount("an amount does not fit in uint256")
    tree = tree_of(contract, amounts)
    return Epoch(to_checksum_address(contract), amounts, tree.root, sum(amounts.values()), number)


def claim(ledger: ContractClient, item: Claim) -> int:
    """Send ``item`` (any key may): the tokens credited to the account's earnings now."""
    receipt = ledger._transact(
        "claim",
        item.epoch,
        item.account,
        item.amount,
        list(item.proof),
        messages={
            "invalid_proof": f"the proof for {item.account} does not match epoch {item.epoch}'s root",
            "unknown_epoch": f"no settlement epoch {item.epoch} was posted",
            "insufficient_balance": "the escrow cannot cover this claim",
        },
    )
    logs = ledger.contract.events.Claimed().process_receipt(receipt)
    return int(logs[0]["args"]["paid"]) if logs else 0


def deposit_escrow(ledger: ContractClient, account: str, amount: int) -> int:
    """Buy ``amount`` tokens for ``account`` to spend off chain (the caller's wallet pays)."""
    if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
        raise InvalidAmount(f"escrow deposit must be a positive integer, got {amount!r}")
    ledger._transact(
        "deposit_escrow", ledger._address(account), value=amount * ledger.wei_per_token()
    )
    return amount


@dataclass(frozen=True)
class EscrowDeposit:
    """Tokens a user put in escrow: what the off-chain ledger credits to ``account``."""

    account: str
    tokens: int
    block: int
    tx_hash: str  # with the log index, a unique id to credit each deposit once
    log_index: int


def escrow_deposits(
    ledger: ContractClient, first: int, last: int | None = None
) -> list[EscrowDeposit]:
    """The ``Escrowed`` events of blocks ``[first, last]`` (paged), oldest first.

    The bridge to the SQL ledger: credit each one to its account, keyed by
    ``(tx_hash, log_index)`` so a rescan never credits twice.
    """
    return [
        EscrowDeposit(
            str(log["args"]["account"]),
            int(log["args"]["tokens"]),
            int(log["blockNumber"]),
            "0x" + bytes(log["transactionHash"]).hex(),
            int(log["logIndex"]),
        )
        for log in logs(ledger, "Escrowed", first, last)
    ]


class EpochSettler:
    """Posts epochs for the ledger ``ledger`` is bound to, signing with its (settler) key."""

    def __init__(self, ledger: ContractClient, store: Path | None = None) -> None:
        self.ledger = ledger
        self.store = store
        self.epochs: dict[int, Epoch] = {}
        if store is not None:
            store.mkdir(parents=True, exist_ok=True)
            for path in sorted(store.glob("epoch-*.json")):
                if path.stem != "epoch-pending":
                    epoch = Epoch.from_json(path.read_text())
                    self.epochs[int(epoch.number or 0)] = epoch
            self.recover_pending()

    def latest(self) -> Epoch | None:
        return self.epochs[max(self.epochs)] if self.epochs else None

    def cumulative(self) -> dict[str, int]:
        latest = self.latest()
        return dict(latest.amounts) if latest else {}

    def settle(self, earned: Mapping[str, int]) -> Epoch:
        """Add ``earned`` (account -> tokens due this epoch) and post the new root.

        A failed call changes nothing here, so retrying it with the same ``earned``
        is safe: when the failed attempt's root did land, it is adopted, not posted twice.
        """
        epoch = build_epoch(self.ledger.address, accumulate(self.cumulative(), earned))
        latest = self.latest()
        if latest is not None and latest.root == epoch.root:
            return latest  # nothing new came due: nothing to post
        posted = int(self.ledger._call("epochs_posted"))
        if posted and bytes(self.ledger._call("roots", posted - 1)) == epoch.root:
            return self._posted(epoch, posted - 1)  # a retry: the last attempt's root landed
        backed = int(self.ledger._call("escrow_deposited"))
        if epoch.total > backed:
            raise InsufficientBalance(
                f"the epoch pays {epoch.total} in all, but only {backed} was ever escrowed",
                available=backed,
                needed=epoch.total,
            )
        self._write("epoch-pending", epoch)
        receipt = self.ledger._transact(
            "post_epoch",
            epoch.root,
            epoch.total,
            messages={"unauthorized": f"{self.ledger.actor} is not an authorised settler"},
        )
        (log,) = self.ledger.contract.events.EpochPosted().process_receipt(receipt)
        return self._posted(epoch, int(log["args"]["epoch"]))

    def recover_pending(self) -> Epoch | None:
        """An epoch written but not known posted: keep it if its root is on chain."""
        if self.store is None or not (self.store / "epoch-pending.json").exists():
            return None
        pending = Epoch.from_json((self.store / "epoch-pending.json").read_text())
        posted = int(self.ledger._call("epochs_posted"))
        for number in range(posted - 1, max(-1, posted - 16), -1):
            if bytes(self.ledger._call("roots", number)) == pending.root:
                return self._posted(pending, number)
        (self.store / "epoch-pending.json").unlink()
        return None

    def claim(self, account: str, number: int | None = None) -> int:
        """Claim ``account``'s amount in epoch ``number`` (default the latest), as this key."""
        chosen = self.epochs[number] if number is not None else self.latest()
        if chosen is None:
            raise UnknownAccount("no settlement epoch was posted yet")
        return claim(self.ledger, chosen.claim(account))

    def _posted(self, epoch: Epoch, number: int) -> Epoch:
        done = Epoch(epoch.contract, epoch.amounts, epoch.root, epoch.total, number)
        self.epochs[number] = done
        self._write(f"epoch-{number:08d}", done)
        if self.store is not None:
            (self.store / "epoch-pending.json").unlink(missing_ok=True)
        return done

    def _write(self, stem: str, epoch: Epoch) -> None:
        if self.store is None:
            return
        path = self.store / f"{stem}.json"
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(epoch.to_json())
        tmp.replace(path)
