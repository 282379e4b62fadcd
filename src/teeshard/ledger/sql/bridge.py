"""The SQL ledger's side of epoch settlement: escrow credited in, payouts taken out.

On chain, users buy tokens into the contract's escrow and operators are paid by
epoch (``teeshard.ledger.evm.settlement``); in between, this ledger charges every
request. Two operations connect them (the owner's; ``teeshard.ledger.epochs``
drives them):

- ``credit_escrow`` credits one on-chain deposit to the account named by the
  depositor's wallet address, under the deposit's unique reference
  (``escrow:<tx hash>:<log index>``, a primary key): a rescan, or two bridge
  processes at once, credit it once; the same reference with another account or
  amount is refused.
- ``pay_out_epoch`` takes, in one transaction, every wallet-address account's
  earnings (and the available balance of users who asked for a refund) out of
  the ledger as ``payout`` journal entries, recorded under the epoch's number:
  paying the same epoch again returns what was paid, and a new epoch waits until
  the previous one's root is posted (``mark_posted``). The sum of all payouts per
  account is what the Merkle tree on chain must promise it (cumulative amounts).

``check`` counts escrow credits as money in and payouts as money out, and
compares both tables with the journal.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import Connection, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from teeshard.ledger.interface import (
    BackendError,
    DuplicateRequest,
    InsufficientBalance,
    InvalidAmount,
    JournalEntry,
    LedgerError,
    UnknownAccount,
    check_amount,
)
from teeshard.ledger.sql.rows import apply, get_meta, lock_accounts, now, set_meta
from teeshard.ledger.sql.schema import (
    LIMIT,
    accounts,
    escrow_credits,
    payout_epochs,
    payouts,
    refund_requests,
)

_WALLET = re.compile(r"0x[0-9a-fA-F]{40}")


def is_wallet(account: str) -> bool:
    """Accounts settled on chain are named by a wallet address (checksummed by the bridge)."""
    return _WALLET.fullmatch(account) is not None


@dataclass(frozen=True)
class PayoutBatch:
    """What one settlement epoch took out of the SQL ledger, per account."""

    epoch: int
    contract: str
    earnings: Mapping[str, int] = field(default_factory=dict)  # operator -> tokens
    refunds: Mapping[str, int] = field(default_factory=dict)  # user -> unspent tokens
    posted_number: int | None = None  # the contract's epoch number, once posted
    root: str | None = None

    @property
    def amounts(self) -> dict[str, int]:
        out = dict(self.earnings)
        for account, tokens in self.refunds.items():
            out[account] = out.get(account, 0) + tokens
        return out

    @property
    def total(self) -> int:
        return sum(self.earnings.values()) + sum(self.refunds.values())


def credit_escrow(
    conn: Connection, account: str, tokens: int, reference: str, block: int
) -> JournalEntry | None:
    """Credit one escrow deposit; None when ``reference`` was credited already (the same)."""
    check_amount(tokens, "escrow deposit")
    if not is_wallet(account):
        raise UnknownAccount(f"escrow is credited to wallet addresses, not {account!r}")
    if not reference or len(reference) > 128:
        raise LedgerError(f"an escrow reference is 1-128 characters, got {reference!r}")
    found = conn.execute(
        select(escrow_credits).where(escrow_credits.c.reference == reference)
    ).one_or_none()
    if found is not None:
        if (found.account_id, int(found.tokens)) != (account, tokens):
            raise DuplicateRequest(
                f"{reference} was credited as {found.tokens} to {found.account_id}, "
                f"not {tokens} to {account}"
            )
        return None
    if conn.execute(select(accounts.c.id).where(accounts.c.id == account)).first() is None:
        conn.execute(
            insert(accounts).values(
                id=account, available=0, reserved=0, earnings=0, created_at=now()
            )
        )
    row = lock_accounts(conn, [account])[account]
    if row.available + tokens >= LIMIT:
        raise InvalidAmount(f"crediting {tokens} would take {account} past a balance's limit")
    entry = apply(conn, "escrow", account, available=tokens, memo=reference)
    conn.execute(
        insert(escrow_credits).values(
            reference=reference,
            account_id=account,
            tokens=tokens,
            block=block,
            journal_seq=entry.seq,
            created_at=now(),
        )
    )
    return entry


def request_refund(conn: Connection, account: str) -> None:
    if conn.execute(select(accounts.c.id).where(accounts.c.id == account)).first() is None:
        raise UnknownAccount(f"no account {account!r}")
    if not is_wallet(account):
        raise UnknownAccount(f"refunds are paid on chain to wallet addresses, not {account!r}")
    exists = conn.execute(
        select(refund_requests.c.account_id).where(refund_requests.c.account_id == account)
    ).first()
    if exists is None:
        conn.execute(insert(refund_requests).values(account_id=account, requested_at=now()))


def batches(conn: Connection, epoch: int | None = None) -> list[PayoutBatch]:
    query = select(payout_epochs).order_by(payout_epochs.c.epoch)
    if epoch is not None:
        query = query.where(payout_epochs.c.epoch == epoch)
    found: dict[int, tuple[dict[str, int], dict[str, int]]] = {}
    rows = select(payouts.c.epoch, payouts.c.account_id, payouts.c.kind, payouts.c.tokens)
    for number, account, kind, tokens in conn.execute(rows):
        earnings, refunds = found.setdefault(int(number), ({}, {}))
        (earnings if kind == "earnings" else refunds)[account] = int(tokens)
    out = []
    for row in conn.execute(query):
        earnings, refunds = found.get(int(row.epoch), ({}, {}))
        out.append(
            PayoutBatch(
                int(row.epoch), row.contract, earnings, refunds, row.posted_number, row.root
            )
        )
    return out


def pay_out_epoch(
    conn: Connection, epoch: int, contract: str, backed: int | None = None
) -> PayoutBatch:
    """Take this epoch's payouts out (idempotent by ``epoch``); ``backed``: escrow ever held."""
    (done,) = batches(conn, epoch) or (None,)
    if done is not None:
        if done.contract != contract:
            raise DuplicateRequest(f"payout epoch {epoch} was paid for contract {done.contract}")
        return done
    earlier = batches(conn)
    expected = earlier[-1].epoch + 1 if earlier else 0
    if epoch != expected:
        raise LedgerError(f"the next payout epoch is {expected}, not {epoch}")
    if earlier and earlier[-1].posted_number is None:
        raise LedgerError(f"payout epoch {earlier[-1].epoch} is not posted yet: post it first")
    earnings: dict[str, int] = {}
    for account, amount in conn.execute(
        select(accounts.c.id, accounts.c.earnings).where(accounts.c.earnings > 0)
    ):
        if is_wallet(account):
            earnings[account] = int(amount)
    asked = [a for (a,) in conn.execute(select(refund_requests.c.account_id))]
    locked = lock_accounts(conn, [*earnings, *asked])
    earnings = {a: int(locked[a].earnings) for a in earnings if locked[a].earnings > 0}
    refundable = _refundable(conn, earlier, asked)
    refunds = {
        a: min(int(locked[a].available), refundable[a])
        for a in asked
        if min(int(locked[a].available), refundable[a]) > 0
    }
    batch = PayoutBatch(epoch, contract, earnings, refunds)
    if batch.total == 0:
        return batch  # nothing came due: no epoch is recorded
    if batch.total >= LIMIT:
        raise InvalidAmount(f"an epoch pays at most {LIMIT - 1}; distribute more often")
    paid_before = sum(b.total for b in earlier)
    if backed is not None and paid_before + batch.total > backed:
        raise InsufficientBalance(
            f"epoch {epoch} would pay {paid_before + batch.total} in all, but only {backed} "
            "was ever escrowed on chain (tokens deposited off chain cannot be paid there)",
            available=backed - paid_before,
            needed=batch.total,
        )
    conn.execute(
        insert(payout_epochs).values(
            epoch=epoch, contract=contract, total=batch.total, created_at=now()
        )
    )
    memo = f"payout epoch {epoch}"
    for kind, amounts in (("earnings", earnings), ("refund", refunds)):
        for account, tokens in sorted(amounts.items()):
            if kind == "earnings":
                entry = apply(conn, "payout", account, earnings=-tokens, memo=memo)
            else:
                entry = apply(conn, "payout", account, available=-tokens, memo=memo)
            conn.execute(
                insert(payouts).values(
                    epoch=epoch,
                    account_id=account,
                    kind=kind,
                    tokens=tokens,
                    journal_seq=entry.seq,
                )
            )
    if asked:
        conn.execute(delete(refund_requests).where(refund_requests.c.account_id.in_(asked)))
    return batch


def _refundable(conn: Connection, earlier: list[PayoutBatch], asked: list[str]) -> dict[str, int]:
    """Per account, what it escrowed on chain less what was refunded: the most a refund pays.

    Tokens the owner deposited off chain are not in the escrow, so they are never
    paid out of it to their holder (they stay spendable in SQL).
    """
    out = dict.fromkeys(asked, 0)
    for account, tokens in conn.execute(
        select(escrow_credits.c.account_id, escrow_credits.c.tokens).where(
            escrow_credits.c.account_id.in_(asked)
        )
    ):
        out[account] += int(tokens)
    for batch in earlier:
        for account, tokens in batch.refunds.items():
            if account in out:
                out[account] -= tokens
    return out


def mark_posted(conn: Connection, epoch: int, number: int, root: str) -> None:
    (batch,) = batches(conn, epoch) or (None,)
    if batch is None:
        raise LedgerError(f"no payout epoch {epoch}")
    if batch.posted_number is not None and (batch.posted_number, batch.root) != (number, root):
        raise DuplicateRequest(f"payout epoch {epoch} was posted as {batch.posted_number}")
    conn.execute(
        update(payout_epochs)
        .where(payout_epochs.c.epoch == epoch)
        .values(posted_number=number, root=root, posted_at=now())
    )


class BridgeOps:
    """``SqlLedger``'s bridge operations (owner only); see the module docstring."""

    if TYPE_CHECKING:
        _actor: str

        def _write(self) -> AbstractContextManager[Connection]: ...
        def _read(self) -> AbstractContextManager[Connection]: ...
        def _require_owner(self, conn: Connection, what: str) -> None: ...

    def credit_escrow(
        self, account: str, tokens: int, reference: str, block: int = 0
    ) -> JournalEntry | None:
        """Credit an on-chain escrow deposit once; None if ``reference`` was credited."""
        for attempt in range(3):
            try:
                with self._write() as conn:
                    self._require_owner(conn, "credit escrow deposits")
                    return credit_escrow(conn, account, tokens, reference, block)
            except BackendError as exc:
                # Another bridge inserted the same reference (or opened the account) first.
                if not isinstance(exc.__cause__, IntegrityError) or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def request_refund(self, account: str) -> None:
        """Ask for ``account``'s unspent tokens back on chain at the next epoch (it, or owner)."""
        with self._write() as conn:
            if self._actor != account:
                self._require_owner(conn, f"ask for {account!r}'s refund")
            request_refund(conn, account)

    def pay_out_epoch(self, epoch: int, contract: str, backed: int | None = None) -> PayoutBatch:
        """Take epoch ``epoch``'s payouts out of the ledger, once (see ``pay_out_epoch``)."""
        try:
            with self._write() as conn:
                self._require_owner(conn, "pay out settlement epochs")
                return pay_out_epoch(conn, epoch, contract, backed)
        except BackendError as exc:
            if not isinstance(exc.__cause__, IntegrityError):
                raise
            with self._read() as conn:  # another bridge paid this epoch first: theirs stands
                (done,) = batches(conn, epoch) or (None,)
            if done is None:
                raise
            return done

    def mark_posted(self, epoch: int, number: int, root: str) -> None:
        with self._write() as conn:
            self._require_owner(conn, "record posted epochs")
            mark_posted(conn, epoch, number, root)

    def payout_batches(self) -> list[PayoutBatch]:
        with self._read() as conn:
            return batches(conn)

    def bridge_state(self, key: str) -> str | None:
        with self._read() as conn:
            return get_meta(conn, f"bridge:{key}")

    def set_bridge_state(self, key: str, value: str) -> None:
        with self._write() as conn:
            self._require_owner(conn, "record the bridge's progress")
            set_meta(conn, f"bridge:{key}", value)
