"""``/v1/attestation``: a node's evidence for a verifier's nonce, and the chain after it.

Nothing here ever holds a prompt, a completion or a hidden state: a bundle is the
quote, the event log, the manifest, the certificate and a signature over the nonce.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query

from teeshard.attest.client import CHAIN_PATH
from teeshard.attest.errors import AttestationError
from teeshard.entry.errors import APIError
from teeshard.node.trust import NodeTrust

NONCE_QUERY = Query(..., description="fresh random nonce, 16 to 64 bytes as hex")


def build_attestation_router(trust: NodeTrust) -> APIRouter:
    router = APIRouter()

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
            return trust.chain(nonce)
        except AttestationError as exc:
            raise APIError(400, str(exc), param="nonce") from None

    return router
