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
as the identity a ledger object was opened with (an SQL actor, authenticated by
the ledger service's per-actor key, or the wallet whose key signs on chain).

Trust (issue 9; README "Trust model of the ledger"): a reservation carries the
user's authorisation (the hash of one of the account's API keys, checked by the
ledger) and the most tokens it may credit; settle credits only admitted nodes
whose signed receipts verify, by the layers each ran, with the cost the request
paid; an entry node spends at most its limit per period; admissions carry a
claim signed by the node's attested key naming its operator, and expire unless
renewed each admission epoch; reservations belong to a process lease, and only
reservations of expired leases are recovered.

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
     ├── ClaimRefused                no valid operator claim signed by the node's attested key
     ├── SpendLimitExceeded          an entry node's spend limit for the period is used up
     ├── UnverifiedWork              a receipt that does not prove the work it is credited for
     ├── NotSupported                this backend does not do this (e.g. on chain: off-chain ops)
     └── BackendError                the store or chain failed (I/O, revert w/o reason)
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from teeshard.attest.receipts import Receipt
    from teeshard.ledger.claims import AttestedNode, OperatorClaim

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
    idempotency_key: str | None = None  # the client's Idempotency-Key, when it sent one


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
    admitted: bool  # an entry node checked its attestation, and the admission has not expired
    served_tokens: int  # since the last distribution
    served_total: int  # ever
    earned: int = 0  # revenue credited since the last distribution (SQL)
    admitted_until: float = 0.0  # unix seconds; 0 when not admitted (SQL)


@dataclass(frozen=True)
class Distribution:
    pool_before: int
    distributed: int
    remainder: int  # SQL: went to the treasury; chain: stays in the pool
    shares: Mapping[str, int] = field(default_factory=dict)  # operator -> amount
    tokens: Mapping[str, int] = field(default_factory=dict)  # node id -> tokens counted
    treasury: int = 0  # revenue no verified work earned, and rounding (SQL)


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


class ClaimRefused(LedgerError):
    code = "claim_refused"


class SpendLimitExceeded(LedgerError):
    code = "spend_limit_exceeded"


class UnverifiedWork(LedgerError):
    code = "unverified_work"


class NotSupported(LedgerError):
    code = "not_supported"


class BackendError(LedgerError):
    code = "backend_error"


MAX_AMOUNT = 2**62  # single amounts, and every stored balance (CHECK constraints)
MAX_TOKENS_PER_SETTLE = 2**32  # tokens one settle may credit one node
TREASURY = "@treasury"  # the account revenue with no verified work goes to


def check_amount(amount: object, what: str = "amount") -> int:
    """Amounts are positive integers; anything else is refused, never rounded."""
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise InvalidAmount(f"{what} must be an integer, got {amount!r}")
    if amount <= 0:
        raise InvalidAmount(f"{what} must be positive, got {amount}")
    if amount >= MAX_AMOUNT:
        raise InvalidAmount(f"{what} {amount} is too large (limit {MAX_AMOUNT - 1})")
    return amount


def check_tokens(served: Mapping[str, int], bound: int | None = None) -> dict[str, int]:
    """Tokens per node: positive, at most ``MAX_TOKENS_PER_SETTLE`` and ``bound``."""
    limit = min(MAX_TOKENS_PER_SETTLE, bound) if bound is not None else MAX_TOKENS_PER_SETTLE
    out: dict[str, int] = {}
    for node_id, tokens in served.items():
        out[node_id] = check_amount(tokens, f"tokens served by {node_id}")
        if tokens > limit:
            raise InvalidAmount(
                f"{tokens} tokens credited to {node_id}: more than the request could "
                f"have served ({limit})"
            )
    return out


# -- the protocol --------------------------------------------------------------------


@runtime_checkable
class Ledger(Protocol):
    """One ledger, opened as one identity (``actor``). Methods are blocking."""

    @property
    def actor(self) -> str: ...
    def ledger_id(self) -> str: ...  # what operator claims name: an id, or the contract

    # accounts
    def open_account(self, account: str) -> None: ...
    def add_api_key(self, account: str, api_key: str) -> None: ...
    def account_for_key(self, api_key: str) -> str: ...
    def deposit(self, account: str, amount: int) -> JournalEntry: ...
    def balance(self, account: str) -> Balance: ...
    def history(self, account: str, limit: int = 100) -> list[JournalEntry]: ...

    # charges (authorised entry nodes only)
    def authorize_entry(
        self, entry: str, *, spend_limit: int | None = None, period_s: float = 86400.0
    ) -> None: ...
    def reserve(
        self,
        request_id: str,
        account: str,
        amount: int,
        *,
        key_hash: str | None = None,  # hash_api_key() of the caller's key: its authorisation
        max_tokens: int | None = None,  # prompt + max completion tokens: the most it credits
        idempotency_key: str | None = None,  # a retried request with this key is charged once
    ) -> ReservationRecord: ...
    def settle(
        self,
        request_id: str,
        cost: int,
        served: Mapping[str, int],
        *,
        receipts: Sequence[Receipt] = (),  # the request's signed receipt chain
    ) -> ReservationRecord: ...
    def release(self, request_id: str) -> ReservationRecord: ...
    def reservation(self, request_id: str) -> ReservationRecord: ...
    def heartbeat(self) -> None: ...  # renew this process's lease
    def recover(self, older_than_s: float | None = None) -> list[str]: ...
    def open_reservations(self, older_than_s: float = 0.0) -> list[ReservationRecord]: ...

    # the pool
    def register_node(
        self, node: NodeInfo, *, claim: OperatorClaim | None = None
    ) -> NodeRecord: ...
    def admit_node(
        self, node_id: str, manifest_hash: str, *, attested: AttestedNode | None = None
    ) -> NodeRecord: ...
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
