"""The ledger: accounts, charges and the contribution pool, behind one protocol.

Every backend (SQL in ``teeshard.ledger.sql``, an EVM contract in
``teeshard.ledger.evm``) implements ``Ledger`` with the same behaviour; one test
suite runs against all of them.

Money model, all integers in the ledger's smallest unit ("tokens"):

- a **deposit** credits an account's available balance;
- a **reservation** moves the most a request can cost from available to
  reserved, before anything is generated; **settle** moves the real cost to the
  pool and the rest back to available, and credits the nodes that served the
  request with its model tokens; **release** moves all of it back;
- **distribute** splits the pool among node operators in proportion to the
  model tokens their nodes served since the last distribution (integer shares,
  rounded down; the remainder stays in the pool for the next distribution, so no
  dust is lost); **withdraw** pays an operator's earnings out.

Roles: the **owner** runs the ledger and authorises **entry nodes**, which alone
may reserve, settle and release (and admit nodes whose attestation they checked);
**operators** register nodes and alone edit or remove them. Every operation acts
as the identity a ledger object was opened with (an SQL actor name, or the
wallet whose key signs transactions on chain).

Exceptions::

    LedgerError                      every ledger failure; ``.code`` names it
     ├── InvalidAmount               zero, negative or non-integer amount
     ├── UnknownAccount              no such account or API key
     ├── UnknownNode                 no such node (or it was removed)
     ├── UnknownRequest              no reservation under that request id
     ├── Unauthorized                the caller may not do this
     ├── InsufficientBalance         available balance below the amount
     ├── InsufficientEarnings        withdrawal above the operator's earnings
     ├── DuplicateRequest            request id already used differently
     ├── ReservationClosed           settle/release of a closed reservation
     ├── DuplicateNode               node id already registered
     ├── DuplicateKey                API key already bound to an account
     ├── ManifestMismatch            admission with a manifest hash other than the registered one
     └── BackendError                the store or chain failed (I/O, revert w/o reason)
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

# -- records -------------------------------------------------------------------------


@dataclass(frozen=True)
class Balance:
    account: str
    available: int  # may be reserved for new requests
    reserved: int  # held by open reservations
    earnings: int  # an operator's share of distributed pools, not yet withdrawn


class ReservationState(enum.StrEnum):
    RESERVED = "reserved"
    SETTLED = "settled"
    RELEASED = "released"


@dataclass(frozen=True)
class ReservationRecord:
    request_id: str
    account: str
    amount: int  # reserved: the most the request can cost
    holder: str  # the entry node that reserved it
    state: ReservationState
    cost: int = 0  # charged when settled
    created_at: float = 0.0  # unix seconds


@dataclass(frozen=True)
class JournalEntry:
    """One balance change. Deltas per bucket; the journal is append-only."""

    seq: int  # position in the journal (row id, or block/log index on chain)
    at: float  # unix seconds
    kind: str  # deposit, reserve, settle, release, distribute, withdraw
    account: str
    available: int = 0  # change of the available balance
    reserved: int = 0  # change of the reserved balance
    earnings: int = 0  # change of earnings
    pool: int = 0  # change of the pool
    request_id: str | None = None
    memo: str | None = None


@dataclass(frozen=True)
class NodeInfo:
    """What an operator registers: where the node is and what it serves."""

    node_id: str  # the id the node reports in ``served_by`` (e.g. host:port)
    url: str
    manifest_hash: str  # hex SHA-256 of the shard manifest
    model: str = ""
    layers: str = ""  # "START:END"


@dataclass(frozen=True)
class NodeRecord:
    node_id: str
    operator: str
    url: str
    manifest_hash: str
    model: str
    layers: str
    admitted: bool  # an entry node (or the owner) checked its attestation
    served_tokens: int  # since the last distribution
    served_total: int  # ever


@dataclass(frozen=True)
class Distribution:
    pool_before: int
    distributed: int
    remainder: int  # stays in the pool (integer rounding, or no work served)
    shares: Mapping[str, int] = field(default_factory=dict)  # operator -> amount
    tokens: Mapping[str, int] = field(default_factory=dict)  # node id -> tokens counted


@dataclass(frozen=True)
class Consistency:
    """Balances recomputed from the journal, compared with the stored ones."""

    ok: bool
    accounts_checked: int
    mismatches: tuple[str, ...] = ()
    total_in: int = 0  # deposits
    total_out: int = 0  # withdrawals
    held: int = 0  # available + reserved + earnings + pool


# -- errors --------------------------------------------------------------------------


class LedgerError(Exception):
    code = "ledger_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidAmount(LedgerError):
    code = "invalid_amount"


class UnknownAccount(LedgerError):
    code = "unknown_account"


class UnknownNode(LedgerError):
    code = "unknown_node"


class UnknownRequest(LedgerError):
    code = "unknown_request"


class Unauthorized(LedgerError):
    code = "unauthorized"


class InsufficientBalance(LedgerError):
    code = "insufficient_balance"

    def __init__(self, message: str, available: int = 0, needed: int = 0) -> None:
        super().__init__(message)
        self.available = available
        self.needed = needed


class InsufficientEarnings(LedgerError):
    code = "insufficient_earnings"


class DuplicateRequest(LedgerError):
    code = "duplicate_request"


class ReservationClosed(LedgerError):
    code = "reservation_closed"


class DuplicateNode(LedgerError):
    code = "duplicate_node"


class DuplicateKey(LedgerError):
    code = "duplicate_key"


class ManifestMismatch(LedgerError):
    code = "manifest_mismatch"


class BackendError(LedgerError):
    code = "backend_error"


MAX_AMOUNT = 2**62  # keeps every sum inside a signed 64-bit SQL integer


def check_amount(amount: object, what: str = "amount") -> int:
    """Amounts are positive integers; anything else is refused, never rounded."""
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise InvalidAmount(f"{what} must be an integer, got {amount!r}")
    if amount <= 0:
        raise InvalidAmount(f"{what} must be positive, got {amount}")
    if amount >= MAX_AMOUNT:
        raise InvalidAmount(f"{what} {amount} is too large (limit {MAX_AMOUNT - 1})")
    return amount


def check_tokens(served: Mapping[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for node_id, tokens in served.items():
        out[node_id] = check_amount(tokens, f"tokens served by {node_id}")
    return out


# -- the protocol --------------------------------------------------------------------


@runtime_checkable
class Ledger(Protocol):
    """One ledger, opened as one identity (``actor``). Methods are blocking."""

    @property
    def actor(self) -> str: ...

    # accounts
    def open_account(self, account: str) -> None: ...
    def add_api_key(self, account: str, api_key: str) -> None: ...
    def account_for_key(self, api_key: str) -> str: ...
    def deposit(self, account: str, amount: int) -> JournalEntry: ...
    def balance(self, account: str) -> Balance: ...
    def history(self, account: str, limit: int = 100) -> list[JournalEntry]: ...

    # charges (authorised entry nodes only)
    def authorize_entry(self, entry: str) -> None: ...
    def reserve(self, request_id: str, account: str, amount: int) -> ReservationRecord: ...
    def settle(
        self, request_id: str, cost: int, served: Mapping[str, int]
    ) -> ReservationRecord: ...
    def release(self, request_id: str) -> ReservationRecord: ...
    def reservation(self, request_id: str) -> ReservationRecord: ...
    def recover(self, older_than_s: float | None = None) -> list[str]: ...

    # the pool
    def register_node(self, node: NodeInfo) -> NodeRecord: ...
    def admit_node(self, node_id: str, manifest_hash: str) -> NodeRecord: ...
    def edit_node(
        self, node_id: str, *, url: str | None = None, manifest_hash: str | None = None
    ) -> NodeRecord: ...
    def remove_node(self, node_id: str) -> None: ...
    def nodes(self) -> list[NodeRecord]: ...
    def is_operator(self, account: str) -> bool: ...
    def pool(self) -> int: ...
    def distribute(self) -> Distribution: ...
    def withdraw(self, amount: int | None = None) -> JournalEntry: ...

    # audit
    def check(self) -> Consistency: ...
    def close(self) -> None: ...


def served_map(served_by: Sequence[str], tokens: int) -> dict[str, int]:
    """Each node on a chain ran every token position through its layers."""
    return {node_id: tokens for node_id in dict.fromkeys(served_by)} if tokens > 0 else {}


def check_request_id(request_id: str) -> str:
    if not isinstance(request_id, str) or not request_id or len(request_id) > 128:
        raise LedgerError(f"request id must be 1-128 characters, got {request_id!r}")
    return request_id


def check_manifest_hash(manifest_hash: str) -> str:
    value = manifest_hash.lower().removeprefix("0x") if isinstance(manifest_hash, str) else ""
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise LedgerError(f"manifest hash must be 64 hex digits (SHA-256), got {manifest_hash!r}")
    return value


def check_node_info(node: NodeInfo) -> NodeInfo:
    if not node.node_id or len(node.node_id) > 128:
        raise LedgerError(f"node id must be 1-128 characters, got {node.node_id!r}")
    if not node.url.startswith(("http://", "https://")) or len(node.url) > 256:
        raise LedgerError(
            f"node URL must be http(s)://... of at most 256 characters, got {node.url!r}"
        )
    return NodeInfo(
        node.node_id, node.url, check_manifest_hash(node.manifest_hash), node.model, node.layers
    )
