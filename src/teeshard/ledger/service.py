"""``teeshard ledger serve``: the SQL ledger behind an authenticated HTTP service.

Where several organisations share one ledger, none of them may hold the
database's credentials: whoever can write to the tables can be anyone. This
service holds them; every other party holds an actor key (made by the owner with
``teeshard ledger add-actor NAME``, stored hashed). For each call it finds the
actor by the key and runs the operation as that actor, through the same role
checks as direct access, so bob's key can act only as bob: he cannot deposit to
himself (only the owner records deposits), act as the owner, authorise an entry
node or charge alice (only entry nodes reserve, and only with one of alice's API
keys). The client is ``teeshard.ledger.remote.RemoteLedger`` (``ledger+https://``).

Wire: ``POST /v1/ledger/OP`` with the arguments as a JSON object; ``200
{"result": ...}`` or an error status with ``{"error": {"code", "message"}}``
(401 no or unknown key, 403 not allowed, 404 unknown, 409 conflicts, 402 no
balance, 503 store failure, 400 otherwise). Serve it over TLS (``--tls-cert``) or
on loopback only: keys travel in the Authorization header.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from teeshard.attest.errors import AttestationError
from teeshard.attest.receipts import receipts_from_json
from teeshard.ledger import interface as li
from teeshard.ledger.claims import AttestedNode, OperatorClaim
from teeshard.ledger.interface import LedgerError, NodeInfo
from teeshard.ledger.remote import LEASE_HEADER, encode, error_body
from teeshard.ledger.sql.engine import Engines
from teeshard.ledger.sql.store import SqlLedger

_STATUS: tuple[tuple[type[LedgerError], int], ...] = (
    (li.Unauthorized, 403),
    (li.SpendLimitExceeded, 403),
    (li.ClaimRefused, 403),
    (li.UnknownAccount, 404),
    (li.UnknownNode, 404),
    (li.UnknownRequest, 404),
    (li.InsufficientBalance, 402),
    (li.InsufficientEarnings, 402),
    (li.DuplicateRequest, 409),
    (li.DuplicateNode, 409),
    (li.DuplicateKey, 409),
    (li.ReservationClosed, 409),
    (li.BackendError, 503),
)

Op = Callable[[SqlLedger, dict[str, Any]], Any]


def _str(args: dict[str, Any], name: str, optional: bool = False) -> Any:
    value = args.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise LedgerError(f"argument {name!r} must be a string")
    return value


def _int(args: dict[str, Any], name: str, optional: bool = False) -> Any:
    value = args.get(name)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise li.InvalidAmount(f"argument {name!r} must be an integer")
    return value


def _num(args: dict[str, Any], name: str, default: float | None) -> Any:
    value = args.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LedgerError(f"argument {name!r} must be a number")
    return float(value)


def _served(args: dict[str, Any]) -> dict[str, int]:
    served = args.get("served")
    if not isinstance(served, dict):
        raise LedgerError("argument 'served' must be an object of node id -> tokens")
    return {str(k): v for k, v in served.items()}


def _node(args: dict[str, Any]) -> NodeInfo:
    node = args.get("node")
    if not isinstance(node, dict):
        raise LedgerError("argument 'node' must be an object")
    return NodeInfo(_str(node, "node_id"), _str(node, "url"), _str(node, "manifest_hash"),
                    str(node.get("model", "")), str(node.get("layers", "")))  # fmt: skip


def _claim(value: object) -> OperatorClaim | None:
    return None if value is None else OperatorClaim.from_json(value)


def _attested(value: object) -> AttestedNode | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise LedgerError("argument 'attested' must be an object")
    claim = OperatorClaim.from_json(value.get("claim"))
    return AttestedNode(_str(value, "url"), claim)


OPS: dict[str, Op] = {
    "whoami": lambda lg, a: lg.actor,
    "ledger_id": lambda lg, a: lg.ledger_id(),
    "open_account": lambda lg, a: lg.open_account(_str(a, "account")),
    "add_api_key": lambda lg, a: lg.add_api_key(_str(a, "account"), _str(a, "api_key")),
    "account_for_key": lambda lg, a: lg.account_for_key(_str(a, "api_key")),
    "deposit": lambda lg, a: lg.deposit(_str(a, "account"), _int(a, "amount")),
    "balance": lambda lg, a: lg.balance(_str(a, "account")),
    "history": lambda lg, a: lg.history(_str(a, "account"), min(_int(a, "limit"), 1000)),
    "authorize_entry": lambda lg, a: lg.authorize_entry(
        _str(a, "entry"),
        spend_limit=_int(a, "spend_limit", True),
        period_s=_num(a, "period_s", 86400.0),
    ),
    "reserve": lambda lg, a: lg.reserve(
        _str(a, "request_id"),
        _str(a, "account"),
        _int(a, "amount"),
        key_hash=_str(a, "key_hash", True),
        max_tokens=_int(a, "max_tokens", True),
        idempotency_key=_str(a, "idempotency_key", True),
    ),
    "settle": lambda lg, a: lg.settle(
        _str(a, "request_id"),
        _int(a, "cost"),
        _served(a),
        receipts=receipts_from_json(a.get("receipts", [])),
    ),
    "release": lambda lg, a: lg.release(_str(a, "request_id")),
    "reservation": lambda lg, a: lg.reservation(_str(a, "request_id")),
    "heartbeat": lambda lg, a: lg.heartbeat(),
    "recover": lambda lg, a: lg.recover(_num(a, "older_than_s", None)),
    "open_reservations": lambda lg, a: lg.open_reservations(_num(a, "older_than_s", 0.0)),
    "register_node": lambda lg, a: lg.register_node(_node(a), claim=_claim(a.get("claim"))),
    "admit_node": lambda lg, a: lg.admit_node(
        _str(a, "node_id"), _str(a, "manifest_hash"), attested=_attested(a.get("attested"))
    ),
    "edit_node": lambda lg, a: lg.edit_node(
        _str(a, "node_id"), url=_str(a, "url", True), manifest_hash=_str(a, "manifest_hash", True)
    ),
    "remove_node": lambda lg, a: lg.remove_node(_str(a, "node_id")),
    "nodes": lambda lg, a: lg.nodes(),
    "is_operator": lambda lg, a: lg.is_operator(_str(a, "account")),
    "pool": lambda lg, a: lg.pool(),
    "distribute": lambda lg, a: lg.distribute(),
    "withdraw": lambda lg, a: lg.withdraw(_int(a, "amount", True)),
    "check": lambda lg, a: lg.check(),
    "request_refund": lambda lg, a: lg.request_refund(_str(a, "account")),
}


def status_for(exc: LedgerError) -> int:
    for kind, status in _STATUS:
        if isinstance(exc, kind):
            return status
    return 400


def create_app(engines: Engines) -> FastAPI:
    """The service over an initialised ledger's engines (``SqlLedger.open(...).engines``)."""
    app = FastAPI(title="teeshard ledger", docs_url=None, redoc_url=None, openapi_url=None)
    service = SqlLedger(engines, "@service")  # looks actors up; acts as nobody

    def run(op: str, key: str, lease: str | None, args: dict[str, Any]) -> Any:
        actor = service.actor_for_key(key)
        incarnation = lease if lease and len(lease) <= 32 and lease.isalnum() else None
        ledger = SqlLedger(engines, actor, incarnation)
        return encode(OPS[op](ledger, args))

    @app.post("/v1/ledger/{op}")
    async def call(op: str, request: Request) -> JSONResponse:
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if not key:
            body = error_body(li.Unauthorized("send 'Authorization: Bearer <actor key>'"))
            return JSONResponse(body, status_code=401)
        if op not in OPS:
            return JSONResponse(error_body(LedgerError(f"no operation {op!r}")), status_code=404)
        try:
            args = await request.json()
        except ValueError:
            args = None
        if not isinstance(args, dict):
            return JSONResponse(error_body(LedgerError("the body must be a JSON object")), 400)
        try:
            result = await asyncio.to_thread(run, op, key, request.headers.get(LEASE_HEADER), args)
        except LedgerError as exc:
            status = 401 if exc.message == "unknown actor key" else status_for(exc)
            return JSONResponse(error_body(exc), status_code=status)
        except (AttestationError, TypeError, ValueError) as exc:
            return JSONResponse(error_body(LedgerError(f"bad arguments: {exc}")), 400)
        return JSONResponse({"result": result})

    return app
