"""``/v1/attestation``: a node's evidence for a verifier's nonce, and the chain after it;
``/v1/operator-claim``: its attested key's word on who operates it, for the ledger.

Nothing here ever holds a prompt, a completion or a hidden state: a bundle is the
quote, the event log, the manifest, the certificate and a signature over the nonce;
a claim is a signature over (operator, node id, ledger id, the registrar's nonce).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Query

from teeshard.attest import CHAIN_PATH, AttestationError
from teeshard.entry import APIError
from teeshard.ledger import ClaimRefused
from teeshard.ledger.claims import CLAIM_PATH, claim_response
from teeshard.server.trust import NodeTrust

NONCE_QUERY = Query(..., description="fresh random nonce, 16 to 64 bytes as hex")


def attach_attestation_routes(
    app: FastAPI, trust: NodeTrust, operator: str | None = None, node_id: str = "node"
) -> None:
    router = APIRouter()

    @router.get(CLAIM_PATH)
    async def operator_claim(
        nonce: str = NONCE_QUERY,
        ledger: str = Query(..., description="the id of the ledger the claim is for"),
    ) -> dict[str, str]:
        """This node's operator, signed by its attested key, for a registrar's nonce."""
        if not operator:
            raise APIError(404, "this node names no operator (start it with --operator)")
        try:
            return claim_response(trust.attestation.identity, operator, node_id, nonce, ledger)
        except ClaimRefused as exc:
            raise APIError(400, exc.message, code=exc.code, param="nonce") from None

    @router.get("/v1/attestation")
    async def attestation(nonce: str = NONCE_QUERY) -> dict[str, Any]:
        try:
            return trust.attestation.bundle_json(nonce)
        except AttestationError as exc:
            raise APIError(400, str(exc), param="nonce") from None

    @router.get(CHAIN_PATH)
    async def attestation_chain(nonce: str = NONCE_QUERY) -> dict[str, Any]:
        """This node's bundle, then those of the nodes after it as they last attested."""
        try:
            return trust.attestation_chain(nonce)
        except AttestationError as exc:
            raise APIError(400, str(exc), param="nonce") from None

    app.include_router(router)
