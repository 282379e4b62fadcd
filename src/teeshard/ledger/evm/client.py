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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from eth_account.signers.local import LocalAccount
from web3 import Web3

from teeshard.attest.receipts import Receipt
from teeshard.ledger.claims import AttestedNode, OperatorClaim, verify_claim
from teeshard.ledger.evm import events
from teeshard.ledger.evm.chain import Chain
from teeshard.ledger.evm.errors import Messages
from teeshard.ledger.evm.transactions import call, transact
from teeshard.ledger.interface import (
    Balance,
    ClaimRefused,
    Consistency,
    Distribution,
    DuplicateRequest,
    InsufficientBalance,
    InvalidAmount,
    JournalEntry,
    LedgerError,
    NodeInfo,
    NodeRecord,
    NotSupported,
    ReservationClosed,
    ReservationRecord,
    ReservationState,
    Unauthorized,
    UnknownAccount,
    UnknownNode,
    UnknownRequest,
    check_amount,
    check_manifest_hash,
    check_node_info,
    check_request_id,
    check_tokens,
)
from teeshard.ledger.keys import hash_api_key

MAX_SERVED = 16  # the contract's bound on nodes named by one settlement
_STATES = {1: ReservationState.RESERVED, 2: ReservationState.SETTLED, 3: ReservationState.RELEASED}


def chain_id_of(text: str) -> bytes:
    """The bytes32 a request or node id is known by on chain."""
    return bytes(Web3.keccak(text=text))


class EvmLedger:
    def __init__(
        self, chain: Chain, address: str, key: LocalAccount, *, from_block: int = 0
    ) -> None:
        self.chain = chain
        self.w3 = chain.w3
        self.contract = chain.contract(address)
        self.address = self.contract.address
        self.key = key
        self.from_block = from_block  # where the event scan starts (the deployment block)
        self._mine: set[str] = set()  # request ids this object reserved (see recover)
        self._wei_per_token: int | None = None

    def as_key(self, key: LocalAccount) -> EvmLedger:
        return EvmLedger(self.chain, self.address, key, from_block=self.from_block)

    @property
    def actor(self) -> str:
        return str(self.key.address)

    def close(self) -> None:
        return None

    # -- plumbing: see teeshard.ledger.evm.transactions -----------------------------

    def _call(self, name: str, *args: Any) -> Any:
        return call(self.chain, self.contract, name, *args)

    def _transact(
        self, name: str, *args: Any, value: int = 0, messages: Messages | None = None
    ) -> Any:
        return transact(
            self.chain, self.contract, self.key, name, *args, value=value, messages=messages
        )

    @staticmethod
    def _address(account: str) -> str:
        if not Web3.is_address(account):
            raise UnknownAccount(
                f"{account!r} is not a wallet address (accounts on chain are addresses)"
            )
        return str(Web3.to_checksum_address(account))

    def wei_per_token(self) -> int:
        if self._wei_per_token is None:
            self._wei_per_token = int(self._call("wei_per_token"))
        return self._wei_per_token

    # -- accounts --------------------------------------------------------------------

    def _require_self(self, account: str, what: str) -> str:
        address = self._address(account)
        if address != self.actor:
            raise Unauthorized(f"on chain only {address} itself may {what} (sign with its key)")
        return address

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

    def ledger_id(self) -> str:
        """Operator claims name the contract."""
        return str(self.address)

    def heartbeat(self) -> None:
        """Leases are an SQL ledger's; per-request charging moves off chain (issue 9, item 7)."""

    def open_reservations(self, older_than_s: float = 0.0) -> list[ReservationRecord]:
        raise NotSupported("listing open reservations on chain: see `teeshard ledger recover`")

    def authorize_entry(
        self, entry: str, *, spend_limit: int | None = None, period_s: float = 86400.0
    ) -> None:
        if spend_limit is not None:
            raise NotSupported("spend limits are the SQL ledger's (charges move off chain)")
        address = self._address(entry)
        self._transact(
            "authorize_entry",
            address,
            True,
            messages={"unauthorized": "only the contract owner may authorise entry nodes"},
        )

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

    def reserve(
        self,
        request_id: str,
        account: str,
        amount: int,
        *,
        key_hash: str | None = None,  # on chain the user's voucher authorises (item 7)
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
        receipts: Sequence[Receipt] = (),  # verified by the SQL ledger; on chain: item 7
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
        """Release this entry's reservations made by earlier processes, and expired ones."""
        if not self._call("entries", self.actor):
            raise Unauthorized(f"{self.actor} is not an authorised entry node and may not recover")
        timeout = int(self._call("reservation_timeout"))
        now = int(self.w3.eth.get_block("latest")["timestamp"])
        released = []
        for request_id, holder in events.reserved_requests(self):
            if request_id in self._mine:
                continue
            record = self._record(request_id)
            if record is None or record.state is not ReservationState.RESERVED:
                continue
            age = now - record.created_at
            expired = older_than_s is not None and age >= max(older_than_s, timeout)
            if holder == self.actor or expired:
                self._transact("release", chain_id_of(request_id))
                released.append(request_id)
        return released

    # -- nodes and pool --------------------------------------------------------------

    def _node(self, node_id: str) -> NodeRecord | None:
        (
            operator,
            name,
            url,
            manifest,
            model,
            layers,
            admitted,
            removed,
            _listed,
            served,
            total,
        ) = self._call("nodes", chain_id_of(node_id))
        if int(operator, 16) == 0 or removed:
            return None
        return NodeRecord(
            name,
            str(operator),
            url,
            bytes(manifest).hex(),
            model,
            layers,
            bool(admitted),
            int(served),
            int(total),
        )

    def _require_node(self, node_id: str) -> NodeRecord:
        record = self._node(node_id)
        if record is None:
            raise UnknownNode(f"no registered node {node_id!r}")
        return record

    def register_node(self, node: NodeInfo, *, claim: OperatorClaim | None = None) -> NodeRecord:
        node = check_node_info(node)
        if claim is not None:  # the contract cannot check P-256 signatures; we do
            verify_claim(claim, operator=self.actor, node_id=node.node_id, ledger_id=self.address)
        self._transact(
            "register_node",
            node.node_id,
            node.url,
            bytes.fromhex(node.manifest_hash),
            node.model,
            node.layers,
            messages={
                "unknown_account": f"operator {self.actor} has no account; open one first",
                "duplicate_node": f"node {node.node_id!r} is already registered "
                "(or was removed with work not yet distributed)",
                "too_many_nodes": "the pool is full; distribute to drop removed nodes",
            },
        )
        return self._require_node(node.node_id)

    def admit_node(
        self, node_id: str, manifest_hash: str, *, attested: AttestedNode | None = None
    ) -> NodeRecord:
        manifest_hash = check_manifest_hash(manifest_hash)
        registered = self._require_node(node_id)
        if attested is not None:  # the admitting entry checks the claim (off chain)
            if attested.url.rstrip("/") != registered.url.rstrip("/"):
                raise ClaimRefused(
                    f"the URL verified ({attested.url}) is not the registered {registered.url}"
                )
            verify_claim(
                attested.claim, operator=registered.operator, node_id=node_id,
                ledger_id=self.address,
            )  # fmt: skip
        self._transact(
            "admit_node",
            chain_id_of(node_id),
            bytes.fromhex(manifest_hash),
            messages={
                "unauthorized": f"{self.actor} is neither an entry node nor the owner: it may not admit nodes",
                "manifest_mismatch": f"node {node_id!r} registered manifest "
                f"{registered.manifest_hash}, but its attestation shows {manifest_hash}: not admitted",
            },
        )
        return self._require_node(node_id)

    def edit_node(
        self, node_id: str, *, url: str | None = None, manifest_hash: str | None = None
    ) -> NodeRecord:
        current = self._require_node(node_id)
        checked = check_node_info(
            NodeInfo(node_id, url or current.url, manifest_hash or current.manifest_hash)
        )
        self._transact(
            "edit_node",
            chain_id_of(node_id),
            checked.url,
            bytes.fromhex(checked.manifest_hash),
            messages={
                "unauthorized": f"only node {node_id!r}'s operator ({current.operator}) may edit it"
            },
        )
        return self._require_node(node_id)

    def remove_node(self, node_id: str) -> None:
        current = self._require_node(node_id)
        self._transact(
            "remove_node",
            chain_id_of(node_id),
            messages={
                "unauthorized": f"only node {node_id!r}'s operator ({current.operator}) may remove it"
            },
        )

    def nodes(self) -> list[NodeRecord]:
        count = int(self._call("node_count"))
        found = []
        for index in range(count):
            node_key = self._call("node_ids", index)
            name = self._call("nodes", node_key)[1]
            record = self._node(name)
            if record is not None:
                found.append(record)
        return sorted(found, key=lambda n: n.node_id)

    def is_operator(self, account: str) -> bool:
        return bool(self._call("is_operator", self._address(account)))

    def pool(self) -> int:
        return int(self._call("pool"))

    def distribute(self) -> Distribution:
        receipt = self._transact("distribute")
        return events.distribution_from_receipt(self, receipt)

    def withdraw(self, amount: int | None = None) -> JournalEntry:
        earnings = int(self._call("earnings", self.actor))
        if amount is None:
            if earnings == 0:
                raise InvalidAmount(f"{self.actor} has no earnings to withdraw")
            amount = earnings
        check_amount(amount, "withdrawal")
        receipt = self._transact(
            "withdraw",
            amount,
            messages={
                "insufficient_earnings": f"{self.actor} has {earnings} in earnings; cannot withdraw {amount}"
            },
        )
        return events.entries_from_receipt(self, receipt, self.actor)[0]

    def check(self) -> Consistency:
        return events.check(self)
