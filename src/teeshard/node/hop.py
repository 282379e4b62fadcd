"""The downstream hop: this stage's link to the next node of the route.

One attested, persistent connection (``PeerClient``, which verifies the next
node's attestation before every (re)connection) carries ``open``, ``step`` and
``close`` for every session of this stage. This module builds those messages and
maps what can go wrong to node errors:

- the next node answered with an error: its code and status are kept (a 503
  when it is full stays a 503);
- its certificate is not the attested one, or it refused this node's own
  attestation: ``attestation_failed`` (502);
- it cannot be reached or the link broke: ``downstream_failed`` (502).

Route selection and failover across replicas belong here as they arrive.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from teeshard.attest import Receipt
from teeshard.model.sampling import SamplingParams
from teeshard.node.errors import DownstreamError, NodeError
from teeshard.transport.codec import tensor_from_wire
from teeshard.transport.messages import (
    CloseMsg,
    OpenMsg,
    ReceiptWire,
    ResultMsg,
    StepMsg,
    WireDtype,
    WireTensor,
)
from teeshard.transport.peer import (
    PeerCertificateError,
    PeerClient,
    PeerError,
    PeerRefusedError,
    RemoteError,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HopStep:
    """What the rest of the route returned for one step."""

    token: int
    logits: torch.Tensor | None = None  # (vocab,) float32 when the session asked for them


class NextHop:
    def __init__(self, peer: PeerClient) -> None:
        self.peer = peer

    @property
    def connected(self) -> bool:
        return self.peer.connected

    async def open_session(
        self,
        session_id: str,
        max_len: int,
        sampling: SamplingParams,
        wire_dtype: WireDtype,
        return_logits: bool,
    ) -> tuple[str, ...]:
        """Open the session on every later node; return their node ids, nearest first."""
        reply = await self._request(
            lambda rid: OpenMsg(
                id=rid,
                session=session_id,
                max_len=max_len,
                wire_dtype=wire_dtype,
                sampling=sampling,
                return_logits=return_logits,
            )
        )
        return reply.route

    async def step(
        self, session_id: str, hidden: WireTensor, on_frame: Callable[[bytes], None]
    ) -> HopStep:
        """Send hidden states on; ``on_frame`` sees the exact bytes sent (for the receipt)."""
        reply = await self._request(
            lambda rid: StepMsg(id=rid, session=session_id, hidden=hidden), on_frame
        )
        if reply.token is None:
            raise DownstreamError("next node returned a step result without a token")
        logits = tensor_from_wire(reply.logits) if reply.logits is not None else None
        return HopStep(reply.token, logits)

    async def close_session(self, session_id: str, receipt: Receipt | None) -> list[Receipt]:
        """Close downstream; with ``receipt`` (this stage's), collect every later stage's.

        Failures are logged, not raised: the session is gone here either way.
        """
        wire = ReceiptWire(**receipt.to_json()) if receipt is not None else None
        try:
            reply = await self._request(
                lambda rid: CloseMsg(
                    id=rid, session=session_id, sign=wire is not None, receipt=wire
                )
            )
            return [Receipt.from_json(r.model_dump()) for r in reply.receipts]
        except NodeError as exc:
            log.info("a downstream close failed: %s", exc.code)
            return []

    async def keep_connected(self) -> None:
        """Connect now so problems show at start; retry with backoff until connected.

        Requests also (re)connect lazily, so this only brings the first link up early.
        """
        delay = 0.5
        while not self.peer.connected:
            try:
                await self.peer.connect()
            except (PeerError, NodeError) as exc:
                log.warning("next node not ready (%s); retrying in %.0fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def disconnect(self) -> None:
        await self.peer.disconnect()

    def stats(self) -> dict[str, Any]:
        return self.peer.stats()

    async def _request(
        self,
        build: Callable[[int], OpenMsg | StepMsg | CloseMsg],
        on_frame: Callable[[bytes], None] | None = None,
    ) -> ResultMsg:
        try:
            return await self.peer.request(build, on_frame)
        except RemoteError as exc:
            raise NodeError(f"next node: {exc}", code=exc.code, status=exc.status) from None
        except (PeerCertificateError, PeerRefusedError) as exc:
            raise DownstreamError(f"next node refused: {exc}", code="attestation_failed") from None
        except PeerError as exc:
            raise DownstreamError(f"next node unavailable: {exc}") from None
