"""JSON endpoints of the web console (``/v1/console/...``) and its page.

Thin: parse, call the ledger adapter, the network view or the registration
flow on a thread (they block), map failures to the OpenAI error shape.

| route | auth | what |
| --- | --- | --- |
| ``GET /v1/console/info`` | - | model, ledger kind, the contract for wallets |
| ``GET /v1/console/account`` | key | balance, reserved, earnings, free use |
| ``GET /v1/console/usage`` | key | requests with what was held and charged |
| ``GET /v1/console/network`` | - | entry health, next hop, every stage re-verified |
| ``GET /v1/console/pool`` | - | the pool, admitted nodes, work served, pending payouts |
| ``POST /v1/console/pool/inspect`` | key | fetch and verify a node's attestation, find its slot |
| ``POST /v1/console/pool/register`` | key | register as the key's account (SQL), then admit |
| ``POST /v1/console/pool/admit`` | key | the entry verifies and admits the key's own node |
| ``POST /v1/console/pool/withdraw`` | key | pay out the account's earnings (SQL) |
| ``POST /v1/console/wallet/tx`` | - | an unsigned contract call for the user's wallet (EVM) |

Admitting stays the entry node's authority: it admits only a node it has just
verified itself, and only for that node's own operator.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any, Protocol, TypeVar

from fastapi import APIRouter, FastAPI, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from teeshard.attest.verify.policy import Policy
from teeshard.attest.verify.quote import CollateralSource
from teeshard.entry.console_ledger import ConsoleLedger, ledger_kind
from teeshard.entry.console_network import network_view
from teeshard.entry.console_static import build_static_router
from teeshard.entry.console_wallet import WalletTxError, WalletTxRequest, prepare
from teeshard.entry.errors import APIError
from teeshard.entry.routes import bearer_token
from teeshard.entry.serving import OpenAIServing
from teeshard.ledger.interface import (
    BackendError,
    DuplicateNode,
    InsufficientEarnings,
    InvalidAmount,
    Ledger,
    LedgerError,
    Unauthorized,
    UnknownAccount,
    UnknownNode,
)
from teeshard.ledger.registration import (
    AttestVerifier,
    ExpectedShards,
    RegistrationRefused,
    VerifiedBundle,
    admit_from_url,
    default_node_id,
    register_from_url,
    verify_node,
)

T = TypeVar("T")
PREFIX = "/v1/console"


class AttestationSource(Protocol):
    """The entry node's trust state (``NodeTrust`` is one)."""

    @property
    def policy(self) -> Policy: ...

    @property
    def collateral(self) -> CollateralSource | None: ...

    def attestation_chain(self, nonce_hex: str) -> dict[str, Any]: ...


class NodeUrl(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    url: str = Field(min_length=8, max_length=256, description="https://host:port of the node")


class Withdrawal(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    amount: int | None = Field(None, description="tokens; default: all earnings")


def build_console_router(
    serving: OpenAIServing,
    attestation: AttestationSource,
    health: Callable[[Request], Mapping[str, Any]],
) -> APIRouter:
    router = APIRouter()
    router.include_router(build_static_router())
    # the entry's Billing, when it is a ledger's (LedgerBilling), behind BillingAPI
    billing = getattr(serving.generations.billing, "billing", None)
    raw: object = getattr(billing, "ledger", None)
    ledger = ConsoleLedger(raw) if isinstance(raw, Ledger) else None
    free_for_operators = bool(getattr(billing, "free_for_operators", False))

    def need_ledger() -> ConsoleLedger:
        if ledger is None:
            raise APIError(404, "this entry node has no ledger: use is free", code="no_ledger")
        return ledger

    def verifier() -> AttestVerifier:
        return AttestVerifier(attestation.policy, attestation.collateral)

    def expected() -> ExpectedShards:
        try:
            return ExpectedShards.from_policy(attestation.policy)
        except ValueError as exc:
            raise APIError(503, f"cannot check shards: {exc}", code="no_expected_shards") from None

    @router.get(f"{PREFIX}/info")
    async def info() -> dict[str, Any]:
        evm = None
        if ledger is not None and ledger.kind == "evm":
            chain_ledger: Any = ledger.ledger
            evm = {
                "contract": str(chain_ledger.address),
                "chain_id": await _blocking(lambda: int(chain_ledger.w3.eth.chain_id)),
                "wei_per_token": await _blocking(chain_ledger.wei_per_token),
            }
        return {
            "model": serving.model_name,
            "ledger": ledger_kind(ledger.ledger if ledger else None),
            "free_for_operators": free_for_operators,
            "evm": evm,
        }

    @router.get(f"{PREFIX}/account")
    async def account(request: Request) -> dict[str, Any]:
        key = _key(request)
        view = await _blocking(lambda: need_ledger().account(key, free_for_operators))
        return view.to_json()

    @router.get(f"{PREFIX}/usage")
    async def usage(request: Request, limit: int = Query(50, ge=1, le=500)) -> dict[str, Any]:
        key = _key(request)
        rows = await _blocking(lambda: need_ledger().usage(key, limit))
        return {"object": "list", "data": [r.to_json() for r in rows]}

    @router.get(f"{PREFIX}/network")
    async def network(request: Request) -> dict[str, Any]:
        seen = health(request)  # load detail only for the admin token or on loopback
        view = await _blocking(lambda: network_view(
            attestation.attestation_chain, attestation.policy, seen, attestation.collateral))  # fmt: skip
        registered = []
        if ledger is not None:
            _, nodes = await _blocking(need_ledger().pool)
            registered = [n.to_json() for n in nodes]
        return {**view, "models": serving.models()["data"], "registered": registered}

    @router.get(f"{PREFIX}/pool")
    async def pool() -> dict[str, Any]:
        total, nodes = await _blocking(need_ledger().pool)
        return {"pool": total, "nodes": [n.to_json() for n in nodes]}

    @router.post(f"{PREFIX}/pool/inspect")
    async def inspect(body: NodeUrl, request: Request) -> dict[str, Any]:
        # the entry node fetches the URL: only for callers with a key (no anonymous probing)
        key, console, shards = _key(request), need_ledger(), expected()
        await _blocking(lambda: console.ledger.account_for_key(key))
        found = await _blocking(lambda: verify_node(body.url, shards, verifier()))
        return _found(body.url, found)

    @router.post(f"{PREFIX}/pool/register")
    async def register(body: NodeUrl, request: Request) -> dict[str, Any]:
        key, console, shards = _key(request), need_ledger(), expected()

        def run() -> dict[str, Any]:
            # the registration flow of teeshard.ledger, as the key's account; then the
            # entry node, which has just verified the node itself, admits it
            done = register_from_url(console.acting_as(key), body.url, shards, verifier())
            record = done.node
            if not done.admitted:
                record = admit_from_url(console.ledger, body.url, shards, verifier(),
                                        node_id=record.node_id)  # fmt: skip
            return {**_found(body.url, done.verified), "node": asdict(record),
                    "admitted": record.admitted}  # fmt: skip

        return await _blocking(run)

    @router.post(f"{PREFIX}/pool/admit")
    async def admit(body: NodeUrl, request: Request) -> dict[str, Any]:
        key, console, shards = _key(request), need_ledger(), expected()

        def run() -> dict[str, Any]:
            account = console.ledger.account_for_key(key)
            node_id = default_node_id(body.url)
            mine = [n for n in console.ledger.nodes() if n.node_id == node_id]
            if not mine:
                raise UnknownNode(f"no node {node_id!r} is registered: register it first")
            if mine[0].operator.lower() != account.lower():
                raise Unauthorized(f"node {node_id!r} belongs to another operator")
            record = admit_from_url(console.ledger, body.url, shards, verifier(), node_id=node_id)
            found = VerifiedBundle(record.manifest_hash, "", record.model, record.layers)
            return {**_found(body.url, found), "node": asdict(record), "admitted": record.admitted}

        return await _blocking(run)

    @router.post(f"{PREFIX}/pool/withdraw")
    async def withdraw(body: Withdrawal, request: Request) -> dict[str, Any]:
        key, console = _key(request), need_ledger()
        entry = await _blocking(lambda: console.withdraw(key, body.amount))
        return {"withdrawn": -entry.earnings, "account": entry.account}

    @router.post(f"{PREFIX}/wallet/tx")
    async def wallet_tx(body: WalletTxRequest) -> dict[str, Any]:
        console = need_ledger()
        if console.kind != "evm":
            raise APIError(409, "this ledger is SQL: no wallet transactions", code="not_evm")
        try:
            tx = await _blocking(lambda: prepare(console.ledger, body))
        except WalletTxError as exc:
            raise APIError(400, str(exc), code="invalid_transaction") from None
        return tx.to_json()

    return router


def attach_console(
    app: FastAPI,
    serving: OpenAIServing,
    attestation: AttestationSource,
    health: Callable[[Request], Mapping[str, Any]],
) -> None:
    """Serve the web console (``/``, ``/console/*``) and its JSON endpoints on ``app``."""
    app.include_router(build_console_router(serving, attestation, health))


def _found(url: str, found: VerifiedBundle) -> dict[str, Any]:
    return {
        "url": url,
        "node_id": default_node_id(url),
        "provider": found.provider,
        "insecure": any("INSECURE" in note for note in found.notes),
        "model": found.model,
        "layers": found.layers,
        "manifest_hash": found.manifest_hash,
        "notes": list(found.notes),
    }


def _key(request: Request) -> str:
    key = bearer_token(request.headers.get("authorization"))
    if key is None:
        raise APIError(401, "send 'Authorization: Bearer <api key>'", code="missing_api_key")
    return key


_STATUS: tuple[tuple[type[LedgerError], int], ...] = (
    (UnknownAccount, 401),
    (Unauthorized, 403),
    (UnknownNode, 404),
    (DuplicateNode, 409),
    (InsufficientEarnings, 400),
    (InvalidAmount, 400),
    (BackendError, 503),
)


async def _blocking(fn: Callable[[], T]) -> T:
    """Run a blocking ledger or attestation call on a thread; map its failures."""
    try:
        return await asyncio.to_thread(fn)
    except RegistrationRefused as exc:
        raise APIError(422, str(exc), code="registration_refused") from None
    except NotImplementedError as exc:
        raise APIError(409, str(exc), code="use_wallet") from None
    except LedgerError as exc:
        status = next((s for kind, s in _STATUS if isinstance(exc, kind)), 400)
        raise APIError(status, exc.message, code=exc.code) from None
