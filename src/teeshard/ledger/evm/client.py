"""The EVM ledger client: ``Ledger`` over the ``TokenLedger`` contract through web3.py.

Accounts are wallet addresses; an API key is bound to one by its hash
(``bind_key``). Request and node ids are strings here and ``keccak256`` of
their UTF-8 bytes on chain. Every transaction is first estimated (a revert
surfaces with its reason before anything is sent), then signed locally with
this client's key and sent; a revert that only happens on chain (another
transaction got in first) is re-run as a call to recover its reason.

Idempotency is read before it is written: a replayed reserve, settle or
release looks at the reservation on chain and returns it (or refuses) without
sending a transaction.

This is the per-request path (a transaction per reserve and per settle). The
recommended path charges in the SQL ledger and settles on chain once an epoch
(``teeshard.ledger.evm.settlement``); both run on the same contract.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from eth_account.signers.local import LocalAccount

from teeshard.attest.receipts import Receipt
from teeshard.ledger.evm import events
from teeshard.ledger.evm.chain import Chain
from teeshard.ledger.evm.contract import LOG_PAGE_BLOCKS, chain_id_of
from teeshard.ledger.evm.pool import NodePool
from teeshard.ledger.evm.roles import Roles
from teeshard.ledger.interface import (
    Balance,
    Consistency,
    DuplicateRequest,
    InsufficientBalance,
    InvalidAmount,
    JournalEntry,
    LedgerError,
    NotSupported,
    ReservationClosed,
    ReservationRecord,
    ReservationState,
    Unauthorized,
    UnknownAccount,
    UnknownRequest,
    check_amount,
    check_request_id,
    check_tokens,
)
from teeshard.ledger.keys import hash_api_key

MAX_SERVED = 16  # the contract's bound on nodes named by one settlement
_STATES = {1: ReservationState.RESERVED, 2: ReservationState.SETTLED, 3: ReservationState.RELEASED}


class EvmLedger(NodePool, Roles):
    def __init__(
        self,
        chain: Chain,
        address: str,
        key: LocalAccount,
        *,
        from_block: int = 0,
        log_page_blocks: int = LOG_PAGE_BLOCKS,
    ) -> None:
        super().__init__(
            chain, address, key, from_block=from_block, log_page_blocks=log_page_blocks
        )
        self._mine: set[str] = set()  # request ids this object reserved (see recover)
        self._scan = events.ReservationScan()  # what recover has read of the log so far

    def as_key(self, key: LocalAccount) -> EvmLedger:
        return EvmLedger(
            self.chain,
            self.address,
            key,
            from_block=self.from_block,
            log_page_blocks=self.log_page_blocks,
        )

    # -- accounts --------------------------------------------------------------------

    def open_account(self, account: str) -> None:
        self._require_self(account, "open its account")
        if not self._call("known", self.actor):
            self._transact("open_account")

    def add_api_key(self, account: str, api_key: str) -> None:
        self._require_self(account, "bind API keys to its account")
        key_hash = bytes.fromhex(hash_api_key(api_key))
        self._transact(
            "bind_key",
            key_hash,
            messages={"duplicate_key": "this API key is already bound to an account"},
        )

    def remove_api_key(self, account: str, api_key: str) -> None:
        """Revoke an API key: it can no longer spend from the account."""
        self._require_self(account, "revoke API keys of its account")
        self._transact(
            "unbind_key",
            bytes.fromhex(hash_api_key(api_key)),
            messages={"unauthorized": f"this API key is not bound to {self.actor}"},
        )

    def account_for_key(self, api_key: str) -> str:
        owner = self._call("key_owner", bytes.fromhex(hash_api_key(api_key)))
        if int(owner, 16) == 0:
            raise UnknownAccount("no account has this API key")
        return str(owner)

    def deposit(self, account: str, amount: int) -> JournalEntry:
        check_amount(amount, "deposit")
        address = self._address(account)
        receipt = self._transact(
            "deposit",
            address,
            value=amount * self.wei_per_token(),
            messages={"unknown_account": f"no account {address}: it must open_account first"},
        )
        return events.entries_from_receipt(self, receipt, address)[0]

    def refund(self, amount: int | None = None) -> JournalEntry:
        """Pay the caller's unspent (available) tokens back in ETH: all of them by default."""
        available = int(self._call("available", self.actor))
        amount = available if amount is None else amount
        if amount == 0:
            raise InvalidAmount(f"{self.actor} has no unspent tokens to refund")
        check_amount(amount, "refund")
        receipt = self._transact(
            "refund",
            amount,
            messages={
                "insufficient_balance": f"{self.actor} has {available} unspent "
                f"(reserved tokens are not refundable until settled or released); "
                f"cannot refund {amount}"
            },
        )
        return events.entries_from_receipt(self, receipt, self.actor)[0]

    def balance(self, account: str) -> Balance:
        address = self._address(account)
        if not self._call("known", address):
            raise UnknownAccount(f"no account {address}")
        return Balance(
            address,
            int(self._call("available", address)),
            int(self._call("reserved", address)),
            int(self._call("earnings", address)),
        )

    def history(self, account: str, limit: int = 100) -> list[JournalEntry]:
        address = self.balance(account).account
        return events.history(self, address, limit)

    # -- charges ---------------------------------------------------------------------

    def _record(self, request_id: str) -> ReservationRecord | None:
        account, amount, holder, created, state, cost = self._call(
            "reservations", chain_id_of(request_id)
        )
        if state == 0:
            return None
        return ReservationRecord(
            request_id,
            str(account),
            int(amount),
            str(holder),
            _STATES[state],
            int(cost),
            float(created),
        )

    def reservation(self, request_id: str) -> ReservationRecord:
        record = self._record(request_id)
        if record is None:
            raise UnknownRequest(f"no reservation for request {request_id!r}")
        return record

    def ledger_id(self) -> str:
        """Operator claims name the contract."""
        return str(self.address)

    def heartbeat(self) -> None:
        """Leases are the SQL ledger's, where per-request charging belongs (issue 9, item 7)."""

    def open_reservations(self, older_than_s: float = 0.0) -> list[ReservationRecord]:
        raise NotSupported("listing open reservations on chain: see `teeshard ledger recover`")

    def reserve(
        self,
        request_id: str,
        account: str,
        amount: int,
        *,
        key_hash: str | None = None,  # on chain the user's signature authorises (item 7)
        max_tokens: int | None = None,
        idempotency_key: str | None = None,
    ) -> ReservationRecord:
        check_request_id(request_id)
        check_amount(amount, "reservation")
        address = self._address(account)
        existing = self._record(request_id)
        if existing is not None:
            same = (existing.account, existing.amount, existing.holder) == (
                address,
                amount,
                self.actor,
            )
            if same and existing.state is ReservationState.RESERVED:
                return existing
            raise DuplicateRequest(
                f"request id {request_id!r} was already used: {existing.state.value}, "
                f"account {existing.account}, amount {existing.amount}, by {existing.holder}"
            )

        try:
            self._transact(
                "reserve",
                chain_id_of(request_id),
                address,
                amount,
                request_id,
                messages={
                    "unauthorized": f"{self.actor} is not an authorised entry node "
                    "and may not reserve charges",
                    "unknown_account": f"no account {address}",
                    "duplicate_request": f"request id {request_id!r} was already used",
                },
            )
        except InsufficientBalance:
            available = int(self._call("available", address))
            raise InsufficientBalance(
                f"account {address} has {available} available; "
                f"this request may cost up to {amount}",
                available=available,
                needed=amount,
            ) from None
        self._mine.add(request_id)
        return self.reservation(request_id)

    def settle(
        self,
        request_id: str,
        cost: int,
        served: Mapping[str, int],
        *,
        receipts: Sequence[Receipt] = (),  # verified by the SQL ledger, which charges per request
    ) -> ReservationRecord:
        if isinstance(cost, bool) or not isinstance(cost, int) or cost < 0:
            raise InvalidAmount(f"cost must be a non-negative integer, got {cost!r}")
        served = check_tokens(served)
        record = self.reservation(request_id)
        if record.holder != self.actor:
            raise Unauthorized(
                f"reservation {request_id!r} belongs to entry {record.holder}, not {self.actor}"
            )
        if record.state is ReservationState.SETTLED:
            if record.cost == cost:
                return record
            raise DuplicateRequest(
                f"request {request_id!r} was already settled at cost {record.cost}, not {cost}"
            )
        if record.state is ReservationState.RELEASED:
            raise ReservationClosed(
                f"reservation {request_id!r} was released (failed request, restart or timeout) "
                "and cannot be settled"
            )
        if cost > record.amount:
            raise InvalidAmount(f"cost {cost} exceeds the {record.amount} reserved")
        names = sorted(served)
        if len(names) > MAX_SERVED:
            raise LedgerError(
                f"one settlement can credit at most {MAX_SERVED} nodes, got {len(names)}"
            )
        self._transact(
            "settle",
            chain_id_of(request_id),
            cost,
            [chain_id_of(n) for n in names],
            [served[n] for n in names],
            messages={
                "unknown_node": f"a node among {', '.join(names)} is not registered and admitted",
                "unauthorized": f"{self.actor} is not an authorised entry node and may not settle charges",
            },
        )
        return self.reservation(request_id)

    def release(self, request_id: str) -> ReservationRecord:
        record = self.reservation(request_id)
        if record.state is ReservationState.RELEASED:
            return record
        if record.state is ReservationState.SETTLED:
            raise ReservationClosed(
                f"reservation {request_id!r} was settled at cost {record.cost}; it cannot be released"
            )
        if record.holder != self.actor:
            raise Unauthorized(
                f"reservation {request_id!r} belongs to entry {record.holder}, not {self.actor}"
            )
        self._transact("release", chain_id_of(request_id))
        return self.reservation(request_id)

    def recover(self, older_than_s: float | None = None) -> list[str]:
        """Release this entry's reservations made by earlier processes, and expired ones.

        The event log is read in pages of ``log_page_blocks`` blocks (RPC providers
        cap the range of one query), and only once: later calls read the new blocks
        and recheck the reservations still open.
        """
        if not self._call("entries", self.actor):
            raise Unauthorized(f"{self.actor} is not an authorised entry node and may not recover")
        timeout = int(self._call("reservation_timeout"))
        now = int(self.w3.eth.get_block("latest")["timestamp"])
        released = []
        for request_id, holder in self._scan.update(self):
            if request_id in self._mine:
                continue
            record = self._record(request_id)
            if record is None or record.state is not ReservationState.RESERVED:
                self._scan.closed(request_id)
                continue
            age = now - record.created_at
            expired = older_than_s is not None and age >= max(older_than_s, timeout)
            if holder == self.actor or expired:
                self._transact("release", chain_id_of(request_id))
                self._scan.closed(request_id)
                released.append(request_id)
        return released

    def check(self) -> Consistency:
        return events.check(self)
