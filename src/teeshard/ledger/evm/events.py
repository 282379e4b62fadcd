"""The contract's events as the ledger's journal: history, receipts, the audit, recovery.

On chain the journal is the event log. ``check`` replays every balance event
from the deployment block and compares the balances it derives with the
contract's storage, the token totals, and the ETH the contract holds (at
least what the tokens are worth: wei force-sent by a stranger, which no
contract can refuse, is reported as surplus, not as an inconsistency).
Every scan reads the log in pages of ``log_page_blocks`` blocks.
``ReservationScan`` keeps recovery's place in the log; the node registry is
rebuilt from the node events in ``nodes.py``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from eth_utils import keccak
from web3.logs import DISCARD

from teeshard.ledger.evm.transactions import guard
from teeshard.ledger.interface import Consistency, Distribution, JournalEntry

if TYPE_CHECKING:
    from teeshard.ledger.evm.contract import ContractClient as EvmLedger

# event -> (kind, the argument naming the account)
_BALANCE_EVENTS = {
    "Deposited": ("deposit", "account"),
    "Reserved": ("reserve", "account"),
    "Settled": ("settle", "account"),
    "Released": ("release", "account"),
    "Paid": ("distribute", "operator"),
    "Withdrawn": ("withdraw", "operator"),
    "Refunded": ("refund", "account"),
    "Claimed": ("claim", "account"),
}


@dataclass(frozen=True)
class ChainConsistency(Consistency):
    """``Consistency`` plus the wei the contract holds beyond what its tokens are worth."""

    surplus_wei: int = 0


def _seq(log: Any) -> int:
    return int(log["blockNumber"]) * 100_000 + int(log["logIndex"])


class _Clock:
    """Block timestamps, fetched once per block (not at all when ``enabled`` is False)."""

    def __init__(self, ledger: EvmLedger, enabled: bool = True) -> None:
        self.ledger = ledger
        self.enabled = enabled
        self.cache: dict[int, float] = {}

    def __call__(self, block: int) -> float:
        if not self.enabled:
            return 0.0
        if block not in self.cache:
            with guard(self.ledger.chain):
                self.cache[block] = float(self.ledger.w3.eth.get_block(block)["timestamp"])
        return self.cache[block]


def _entry(ledger: EvmLedger, name: str, log: Any, clock: _Clock) -> JournalEntry:
    args = log["args"]
    kind, who = _BALANCE_EVENTS[name]
    at = clock(int(log["blockNumber"]))
    seq = _seq(log)
    account = str(args[who])
    request = "0x" + bytes(args["request_id"]).hex() if "request_id" in args else None
    if name == "Deposited":
        return JournalEntry(seq, at, kind, account, available=int(args["tokens"]))
    if name == "Reserved":
        amount = int(args["amount"])
        return JournalEntry(
            seq, at, kind, account, available=-amount, reserved=amount, request_id=args["request"]
        )
    if name == "Settled":
        amount, cost = int(args["amount"]), int(args["cost"])
        return JournalEntry(
            seq,
            at,
            kind,
            account,
            available=amount - cost,
            reserved=-amount,
            request_id=request,
            memo=f"cost {cost}",
        )
    if name == "Released":
        amount = int(args["amount"])
        memo = "expired" if args["expired"] else None
        return JournalEntry(
            seq,
            at,
            kind,
            account,
            available=amount,
            reserved=-amount,
            request_id=request,
            memo=memo,
        )
    if name == "Paid":
        return JournalEntry(
            seq, at, kind, account, earnings=int(args["amount"]), memo=f"epoch {args['epoch']}"
        )
    if name == "Refunded":
        return JournalEntry(seq, at, kind, account, available=-int(args["tokens"]))
    if name == "Claimed":
        return JournalEntry(
            seq, at, kind, account, earnings=int(args["paid"]), memo=f"settlement {args['epoch']}"
        )
    return JournalEntry(seq, at, kind, account, earnings=-int(args["tokens"]))


def latest_block(ledger: EvmLedger) -> int:
    with guard(ledger.chain):
        return int(ledger.w3.eth.block_number)


def pages(first: int, last: int, size: int) -> Iterator[tuple[int, int]]:
    """Inclusive block ranges of at most ``size`` blocks covering ``[first, last]``."""
    for start in range(first, last + 1, size):
        yield start, min(start + size - 1, last)


def logs(
    ledger: EvmLedger,
    name: str,
    first: int | None = None,
    last: int | None = None,
    filters: dict[str, Any] | None = None,
) -> list[Any]:
    """The ``name`` events in blocks ``[first, last]`` (default: deployment to latest), paged."""
    event = getattr(ledger.contract.events, name)
    first = ledger.from_block if first is None else first
    last = latest_block(ledger) if last is None else last
    found: list[Any] = []
    for start, end in pages(first, last, ledger.log_page_blocks):
        with guard(ledger.chain):
            found.extend(
                event.get_logs(from_block=start, to_block=end, argument_filters=filters or None)
            )
    return found


def history(ledger: EvmLedger, account: str, limit: int) -> list[JournalEntry]:
    clock = _Clock(ledger)
    found = []
    for name, (_, who) in _BALANCE_EVENTS.items():
        for log in logs(ledger, name, filters={who: account}):
            found.append(_entry(ledger, name, log, clock))
    # Settled/Released name requests by hash; show the id the Reserved event carried.
    names = {
        "0x" + keccak(text=e.request_id).hex(): e.request_id
        for e in found
        if e.kind == "reserve" and e.request_id
    }
    found = [replace(e, request_id=names.get(e.request_id or "", e.request_id)) for e in found]
    found.sort(key=lambda e: e.seq, reverse=True)
    return found[:limit]


def entries_from_receipt(ledger: EvmLedger, receipt: Any, account: str) -> list[JournalEntry]:
    clock = _Clock(ledger)
    found = []
    for name, (_, who) in _BALANCE_EVENTS.items():
        for log in getattr(ledger.contract.events, name)().process_receipt(receipt, errors=DISCARD):
            if str(log["args"][who]) == account:
                found.append(_entry(ledger, name, log, clock))
    return sorted(found, key=lambda e: e.seq)


@dataclass
class ReservationScan:
    """Recovery's place in the log: reservations seen and not yet known closed.

    The first ``update`` reads from the deployment block; every later one only
    the blocks since, so a long-lived entry node never rescans the whole log.
    """

    next_block: int | None = None
    open: dict[str, str] = field(default_factory=dict)  # request id -> holder

    def update(self, ledger: EvmLedger) -> list[tuple[str, str]]:
        first = ledger.from_block if self.next_block is None else self.next_block
        last = latest_block(ledger)
        for log in logs(ledger, "Reserved", first, last):
            self.open[log["args"]["request"]] = str(log["args"]["holder"])
        self.next_block = last + 1
        return list(self.open.items())

    def closed(self, request_id: str) -> None:
        self.open.pop(request_id, None)


def distribution_from_receipt(ledger: EvmLedger, receipt: Any) -> Distribution:
    events = ledger.contract.events
    (summary,) = events.Distributed().process_receipt(receipt, errors=DISCARD)
    shares: dict[str, int] = defaultdict(int)
    tokens: dict[str, int] = {}
    for log in events.Paid().process_receipt(receipt, errors=DISCARD):
        args = log["args"]
        shares[str(args["operator"])] += int(args["amount"])
        name = ledger._call("nodes", args["node_id"])[1]
        tokens[name] = int(args["tokens"])
    args = summary["args"]
    return Distribution(
        int(args["pool_before"]),
        int(args["distributed"]),
        int(args["remainder"]),
        dict(shares),
        tokens,
    )


def check(ledger: EvmLedger) -> ChainConsistency:
    """Replay every balance event and compare with the contract's state."""
    clock = _Clock(ledger, enabled=False)  # the audit needs amounts, not times
    last = latest_block(ledger)  # one view: events and storage up to the same block
    derived: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    pool = escrow = 0
    total_in = total_out = 0
    for name in _BALANCE_EVENTS:
        for log in logs(ledger, name, last=last):
            entry = _entry(ledger, name, log, clock)
            row = derived[entry.account]
            row[0] += entry.available
            row[1] += entry.reserved
            row[2] += entry.earnings
            args = log["args"]
            if name == "Settled":
                pool += int(args["cost"])
            elif name == "Paid":
                pool -= int(args["amount"])
            elif name == "Deposited":
                total_in += int(args["tokens"])
            elif name in ("Withdrawn", "Refunded"):
                total_out += int(args["tokens"])
            elif name == "Claimed":
                escrow -= int(args["paid"])
    for log in logs(ledger, "Escrowed", last=last):
        escrow += int(log["args"]["tokens"])
        total_in += int(log["args"]["tokens"])
    # Bonds are held apart from balances; a forfeited one enters the pool (and total_in).
    bonds = {name: 0 for name in ("NodeRegistered", "NodeRemoved", "NodeEvicted")}
    for name in bonds:
        for log in logs(ledger, name, last=last):
            bonds[name] += int(log["args"]["bond"])
    bonded = bonds["NodeRegistered"] - bonds["NodeRemoved"] - bonds["NodeEvicted"]
    pool += bonds["NodeEvicted"]
    total_in += bonds["NodeEvicted"]

    def stored(name: str, *args: Any) -> int:
        with guard(ledger.chain):
            return int(getattr(ledger.contract.functions, name)(*args).call(block_identifier=last))

    mismatches: list[str] = []
    held = 0
    for account, values in sorted(derived.items()):
        row = [stored(name, account) for name in ("available", "reserved", "earnings")]
        if row != values or min(row) < 0:
            mismatches.append(f"{account}: stored {row}, events say {values}")
        held += sum(row)
    for bucket, value in (("pool", pool), ("escrow", escrow), ("bonded", bonded)):
        if stored(bucket) != value:
            mismatches.append(f"{bucket}: stored {stored(bucket)}, events say {value}")
    held += stored("pool") + stored("escrow")
    bonds_in = bonds["NodeRegistered"] - bonds["NodeEvicted"]
    if stored("total_deposited") != total_in + bonds_in:
        mismatches.append("total_deposited does not match the deposit, escrow and bond events")
    if stored("total_withdrawn") != total_out + bonds["NodeRemoved"]:
        mismatches.append("total_withdrawn does not match the withdrawal, refund and bond events")
    if held != total_in - total_out:
        mismatches.append(f"held {held} != deposits {total_in} - withdrawals {total_out}")
    with guard(ledger.chain):
        wei = int(ledger.w3.eth.get_balance(ledger.address, block_identifier=last))
    owed = (held + stored("bonded")) * ledger.wei_per_token()
    if wei < owed:
        mismatches.append(f"the contract holds {wei} wei, less than its {owed} wei of tokens")
    return ChainConsistency(
        not mismatches,
        len(derived),
        tuple(mismatches),
        total_in,
        total_out,
        held,
        surplus_wei=max(0, wei - owed),
    )
