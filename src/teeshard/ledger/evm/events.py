"""The contract's events as the ledger's journal: history, receipts, and the audit.

On chain the journal is the event log. ``check`` replays every balance event
from the deployment block and compares the balances it derives with the
contract's storage, the token totals, and the ETH the contract holds.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from eth_utils import keccak
from web3.logs import DISCARD

from teeshard.ledger.evm.transactions import guard
from teeshard.ledger.interface import Consistency, Distribution, JournalEntry

if TYPE_CHECKING:
    from teeshard.ledger.evm.client import EvmLedger

# event -> (kind, the argument naming the account)
_BALANCE_EVENTS = {
    "Deposited": ("deposit", "account"),
    "Reserved": ("reserve", "account"),
    "Settled": ("settle", "account"),
    "Released": ("release", "account"),
    "Paid": ("distribute", "operator"),
    "Withdrawn": ("withdraw", "operator"),
}


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
    return JournalEntry(seq, at, kind, account, earnings=-int(args["tokens"]))


def _logs(ledger: EvmLedger, name: str, **filters: Any) -> list[Any]:
    event = getattr(ledger.contract.events, name)
    with guard(ledger.chain):
        return list(event.get_logs(from_block=ledger.from_block, argument_filters=filters or None))


def history(ledger: EvmLedger, account: str, limit: int) -> list[JournalEntry]:
    clock = _Clock(ledger)
    found = []
    for name, (_, who) in _BALANCE_EVENTS.items():
        for log in _logs(ledger, name, **{who: account}):
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


def reserved_requests(ledger: EvmLedger) -> list[tuple[str, str]]:
    """(request id, holder) of every reservation ever made on this contract."""
    return [
        (log["args"]["request"], str(log["args"]["holder"])) for log in _logs(ledger, "Reserved")
    ]


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


def check(ledger: EvmLedger) -> Consistency:
    """Replay every balance event and compare with the contract's state."""
    clock = _Clock(ledger, enabled=False)  # the audit needs amounts, not times
    derived: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    pool = 0
    total_in = total_out = 0
    for name in _BALANCE_EVENTS:
        for log in _logs(ledger, name):
            entry = _entry(ledger, name, log, clock)
            row = derived[entry.account]
            row[0] += entry.available
            row[1] += entry.reserved
            row[2] += entry.earnings
            if name == "Settled":
                pool += int(log["args"]["cost"])
            elif name == "Paid":
                pool -= int(log["args"]["amount"])
            elif name == "Deposited":
                total_in += int(log["args"]["tokens"])
            elif name == "Withdrawn":
                total_out += int(log["args"]["tokens"])
    mismatches: list[str] = []
    held = 0
    for account, values in sorted(derived.items()):
        stored = [
            int(ledger._call(name, account)) for name in ("available", "reserved", "earnings")
        ]
        if stored != values or min(stored) < 0:
            mismatches.append(f"{account}: stored {stored}, events say {values}")
        held += sum(stored)
    stored_pool = ledger.pool()
    if stored_pool != pool:
        mismatches.append(f"pool: stored {stored_pool}, events say {pool}")
    held += stored_pool
    if int(ledger._call("total_deposited")) != total_in:
        mismatches.append("total_deposited does not match the Deposited events")
    if int(ledger._call("total_withdrawn")) != total_out:
        mismatches.append("total_withdrawn does not match the Withdrawn events")
    if held != total_in - total_out:
        mismatches.append(f"held {held} != deposits {total_in} - withdrawals {total_out}")
    with guard(ledger.chain):
        wei = int(ledger.w3.eth.get_balance(ledger.address))
    if wei != (total_in - total_out) * ledger.wei_per_token():
        mismatches.append(
            f"the contract holds {wei} wei, not {(total_in - total_out)} tokens' worth"
        )
    return Consistency(not mismatches, len(derived), tuple(mismatches), total_in, total_out, held)
