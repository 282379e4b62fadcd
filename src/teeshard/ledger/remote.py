"""``ledger+http(s)://``: the ``Ledger`` of a ledger service, and the codec both ends share.

Operators, entry nodes and users of a shared ledger hold a per-actor key, not
database credentials: ``teeshard ledger serve`` (``teeshard.ledger.service``)
holds those and acts, for each call, as the actor its key names. This client
sends ``POST /v1/ledger/OP`` with a JSON body of the operation's arguments and
``Authorization: Bearer KEY``; ``Teeshard-Lease`` names this process's lease, so
reservations belong to the client process that made them. Errors come back as
``{"error": {"code", "message", ...}}`` and are raised as the same
``LedgerError`` subclass.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import httpx

from teeshard.attest.receipts import receipts_to_json
from teeshard.ledger import interface as li
from teeshard.ledger.interface import (
    BackendError,
    Balance,
    Consistency,
    Distribution,
    InsufficientBalance,
    JournalEntry,
    LedgerError,
    NodeInfo,
    NodeRecord,
    ReservationRecord,
    ReservationState,
)

if TYPE_CHECKING:
    from teeshard.attest.receipts import Receipt
    from teeshard.ledger.claims import AttestedNode, OperatorClaim

KEY_ENV = "TEESHARD_LEDGER_KEY"
LEASE_HEADER = "Teeshard-Lease"

ERRORS: dict[str, type[LedgerError]] = {
    cls.code: cls
    for cls in vars(li).values()
    if isinstance(cls, type) and issubclass(cls, LedgerError)
}


def encode(value: object) -> Any:
    """Records to JSON: dataclasses as objects, enums by value, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, ReservationState):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [encode(v) for v in value]
    return value


def error_body(exc: LedgerError) -> dict[str, Any]:
    body: dict[str, Any] = {"code": exc.code, "message": exc.message}
    if isinstance(exc, InsufficientBalance):
        body |= {"available": exc.available, "needed": exc.needed}
    return {"error": body}


def raise_error(body: Mapping[str, Any]) -> None:
    error = body.get("error") if isinstance(body, Mapping) else None
    if not isinstance(error, Mapping):
        raise BackendError(f"the ledger service answered without a result: {body!r:.200}")
    cls = ERRORS.get(str(error.get("code")), LedgerError)
    message = str(error.get("message", ""))
    if cls is InsufficientBalance:
        raise InsufficientBalance(
            message, int(error.get("available", 0)), int(error.get("needed", 0))
        )
    raise cls(message)


def _reservation(d: Mapping[str, Any]) -> ReservationRecord:
    return ReservationRecord(**{**d, "state": ReservationState(d["state"])})


def _entry(d: Mapping[str, Any]) -> JournalEntry:
    return JournalEntry(**d)


class RemoteLedger:
    """A ``Ledger`` reached over HTTP(S); ``verify`` as for httpx (a CA file, or a context)."""

    def __init__(
        self,
        base_url: str,
        key: str,
        *,
        verify: bool | str = True,
        timeout_s: float = 30.0,
        lease_id: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {key}"},
            verify=verify,
            timeout=timeout_s,
        )
        self.lease_id = lease_id or uuid.uuid4().hex
        self._actor = str(self._call("whoami"))

    @classmethod
    def from_url(cls, url: str) -> RemoteLedger:
        """``ledger+https://host:port`` (key in ``$TEESHARD_LEDGER_KEY``)."""
        key = os.environ.get(KEY_ENV)
        if not key:
            raise ValueError(f"the ledger service needs your key in ${KEY_ENV}")
        return cls(url.removeprefix("ledger+"), key)

    def _call(self, op: str, **args: Any) -> Any:
        try:
            response = self._client.post(
                f"/v1/ledger/{op}", json=encode(args), headers={LEASE_HEADER: self.lease_id}
            )
        except httpx.HTTPError as exc:
            raise BackendError(f"the ledger service did not answer: {exc}") from None
        try:
            body = response.json()
        except ValueError:
            raise BackendError(f"the ledger service answered HTTP {response.status_code}") from None
        if response.status_code != 200:
            raise_error(body)
        return body.get("result")

    @property
    def actor(self) -> str:
        return self._actor

    def ledger_id(self) -> str:
        return str(self._call("ledger_id"))

    def close(self) -> None:
        self._client.close()

    # accounts
    def open_account(self, account: str) -> None:
        self._call("open_account", account=account)

    def add_api_key(self, account: str, api_key: str) -> None:
        self._call("add_api_key", account=account, api_key=api_key)

    def account_for_key(self, api_key: str) -> str:
        return str(self._call("account_for_key", api_key=api_key))

    def deposit(self, account: str, amount: int) -> JournalEntry:
        return _entry(self._call("deposit", account=account, amount=amount))

    def balance(self, account: str) -> Balance:
        return Balance(**self._call("balance", account=account))

    def history(self, account: str, limit: int = 100) -> list[JournalEntry]:
        return [_entry(e) for e in self._call("history", account=account, limit=limit)]

    # charges
    def authorize_entry(
        self, entry: str, *, spend_limit: int | None = None, period_s: float = 86400.0
    ) -> None:
        self._call("authorize_entry", entry=entry, spend_limit=spend_limit, period_s=period_s)

    def reserve(
        self,
        request_id: str,
        account: str,
        amount: int,
        *,
        key_hash: str | None = None,
        max_tokens: int | None = None,
        idempotency_key: str | None = None,
    ) -> ReservationRecord:
        return _reservation(
            self._call(
                "reserve",
                request_id=request_id,
                account=account,
                amount=amount,
                key_hash=key_hash,
                max_tokens=max_tokens,
                idempotency_key=idempotency_key,
            )
        )

    def settle(
        self,
        request_id: str,
        cost: int,
        served: Mapping[str, int],
        *,
        receipts: Sequence[Receipt] = (),
    ) -> ReservationRecord:
        return _reservation(
            self._call(
                "settle",
                request_id=request_id,
                cost=cost,
                served=dict(served),
                receipts=receipts_to_json(receipts),
            )
        )

    def release(self, request_id: str) -> ReservationRecord:
        return _reservation(self._call("release", request_id=request_id))

    def reservation(self, request_id: str) -> ReservationRecord:
        return _reservation(self._call("reservation", request_id=request_id))

    def heartbeat(self) -> None:
        self._call("heartbeat")

    def recover(self, older_than_s: float | None = None) -> list[str]:
        return [str(r) for r in self._call("recover", older_than_s=older_than_s)]

    def open_reservations(self, older_than_s: float = 0.0) -> list[ReservationRecord]:
        return [_reservation(r) for r in self._call("open_reservations", older_than_s=older_than_s)]

    # the pool
    def register_node(self, node: NodeInfo, *, claim: OperatorClaim | None = None) -> NodeRecord:
        claim_json = claim.to_json() if claim is not None else None
        return NodeRecord(**self._call("register_node", node=node, claim=claim_json))

    def admit_node(
        self, node_id: str, manifest_hash: str, *, attested: AttestedNode | None = None
    ) -> NodeRecord:
        body = {"url": attested.url, "claim": attested.claim.to_json()} if attested else None
        return NodeRecord(
            **self._call("admit_node", node_id=node_id, manifest_hash=manifest_hash, attested=body)
        )

    def edit_node(
        self, node_id: str, *, url: str | None = None, manifest_hash: str | None = None
    ) -> NodeRecord:
        return NodeRecord(
            **self._call("edit_node", node_id=node_id, url=url, manifest_hash=manifest_hash)
        )

    def remove_node(self, node_id: str) -> None:
        self._call("remove_node", node_id=node_id)

    def nodes(self) -> list[NodeRecord]:
        return [NodeRecord(**n) for n in self._call("nodes")]

    def is_operator(self, account: str) -> bool:
        return bool(self._call("is_operator", account=account))

    def pool(self) -> int:
        return int(self._call("pool"))

    def distribute(self) -> Distribution:
        return Distribution(**self._call("distribute"))

    def withdraw(self, amount: int | None = None) -> JournalEntry:
        return _entry(self._call("withdraw", amount=amount))

    def request_refund(self, account: str) -> None:
        """Ask for the account's unspent tokens back on chain at the next settlement epoch."""
        self._call("request_refund", account=account)

    def check(self) -> Consistency:
        d = cast(dict[str, Any], self._call("check"))
        return Consistency(**{**d, "mismatches": tuple(d["mismatches"])})
