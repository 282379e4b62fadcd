"""The console's read model of the ledger: an account, its usage, the pool.

A thin adapter over the existing read methods of :class:`teeshard.ledger.Ledger`
(``account_for_key``, ``balance``, ``history``, ``is_operator``, ``nodes``,
``pool``) and pure functions that shape their records for the web console.
Nothing here writes, except through :meth:`ConsoleLedger.acting_as`
(registering, withdrawing) as the signed-in account, on a ledger that can act
as someone else (SQL); on chain the user's wallet signs instead.

Every call blocks (a database or a JSON-RPC node); callers run them on a thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from teeshard.ledger.interface import JournalEntry, Ledger, NodeRecord

LedgerKind = Literal["none", "sql", "evm"]


@dataclass(frozen=True)
class AccountView:
    account: str
    available: int
    reserved: int
    earnings: int
    operator: bool  # runs a registered node
    free_use: bool  # operators of admitted nodes use the model free

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class UsageRow:
    """One request as the account's journal tells it: held, then charged or released."""

    request_id: str
    at: float
    state: Literal["reserved", "settled", "released"]
    reserved: int  # the most it could cost
    cost: int  # charged (0 unless settled)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PoolNode:
    node_id: str
    operator: str
    url: str
    model: str
    layers: str
    admitted: bool
    served_tokens: int  # since the last distribution
    served_total: int
    pending_payout: int  # its share if the pool were distributed now

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def usage_rows(entries: Iterable[JournalEntry]) -> list[UsageRow]:
    """Fold reserve / settle / release entries into one row per request, newest first.

    A settle entry returns ``amount - cost`` to available and takes ``amount``
    from reserved, so its cost is ``-(available + reserved)`` on every backend.
    """
    rows: dict[str, UsageRow] = {}
    for entry in sorted(entries, key=lambda e: (e.at, e.seq)):
        if entry.request_id is None or entry.kind not in ("reserve", "settle", "release"):
            continue
        known = rows.get(entry.request_id)
        if entry.kind == "reserve":
            rows[entry.request_id] = UsageRow(entry.request_id, entry.at, "reserved",
                                              entry.reserved, 0)  # fmt: skip
        elif known is not None:
            cost = -(entry.available + entry.reserved) if entry.kind == "settle" else 0
            state: Literal["settled", "released"] = (
                "settled" if entry.kind == "settle" else "released"
            )
            rows[entry.request_id] = UsageRow(known.request_id, known.at, state,
                                              known.reserved, cost)  # fmt: skip
    return sorted(rows.values(), key=lambda r: r.at, reverse=True)


def pending_payouts(nodes: Sequence[NodeRecord], pool: int) -> dict[str, int]:
    """What ``distribute`` would give each admitted node now: pool x its share of the work.

    Integer shares, rounded down, as the ledger distributes them (the remainder
    stays in the pool). Nodes not admitted earn nothing.
    """
    work = {n.node_id: n.served_tokens for n in nodes if n.admitted and n.served_tokens > 0}
    total = sum(work.values())
    if total == 0 or pool <= 0:
        return {n.node_id: 0 for n in nodes}
    return {n.node_id: pool * work.get(n.node_id, 0) // total for n in nodes}


def pool_nodes(nodes: Sequence[NodeRecord], pool: int, by_earned: bool) -> list[PoolNode]:
    """``by_earned``: the ledger credits each node what its requests paid (SQL's ``earned``),
    which is what ``distribute`` pays; else the pool split by work, as an estimate."""
    payouts = {n.node_id: n.earned for n in nodes} if by_earned else pending_payouts(nodes, pool)
    return [
        PoolNode(
            n.node_id,
            n.operator,
            n.url,
            n.model,
            n.layers,
            n.admitted,
            n.served_tokens,
            n.served_total,
            payouts[n.node_id],
        )
        for n in nodes
    ]


def ledger_kind(ledger: Ledger | None) -> LedgerKind:
    if ledger is None:
        return "none"
    return "evm" if hasattr(ledger, "contract") else "sql"


@dataclass(frozen=True)
class ConsoleLedger:
    """The entry node's ledger, read for the console (and acted on as the signed-in account)."""

    ledger: Ledger

    @property
    def kind(self) -> LedgerKind:
        return ledger_kind(self.ledger)

    def account(self, api_key: str, free_for_operators: bool = True) -> AccountView:
        account = self.ledger.account_for_key(api_key)
        balance = self.ledger.balance(account)
        free = free_for_operators and self.ledger.is_operator(account)
        return AccountView(balance.account, balance.available, balance.reserved,
                           balance.earnings, self._runs_node(balance.account), free)  # fmt: skip

    def _runs_node(self, account: str) -> bool:
        return any(n.operator.lower() == account.lower() for n in self.ledger.nodes())

    def usage(self, api_key: str, limit: int) -> list[UsageRow]:
        account = self.ledger.account_for_key(api_key)
        # a request is up to three entries; read enough of the journal to fill ``limit`` rows
        return usage_rows(self.ledger.history(account, limit * 3))[:limit]

    def pool(self) -> tuple[int, list[PoolNode]]:
        pool = self.ledger.pool()
        return pool, pool_nodes(self.ledger.nodes(), pool, by_earned=self.kind == "sql")

    def acting_as(self, api_key: str) -> Ledger:
        """The same ledger acting as the key's account: SQL only (on chain, the wallet signs)."""
        account = self.ledger.account_for_key(api_key)
        as_actor = getattr(self.ledger, "as_actor", None)
        if as_actor is None:
            raise NotImplementedError("on an EVM ledger the operator's wallet signs this")
        acting: Ledger = as_actor(account)
        return acting

    def withdraw(self, api_key: str, amount: int | None) -> JournalEntry:
        return self.acting_as(api_key).withdraw(amount)
