"""A client of a node's pipeline socket: open a session, step tokens, close.

Used by benchmarks, tests and tools that drive a chain below the HTTP API; the
entry node itself drives its route through ``NodeService``.
"""

from __future__ import annotations

import uuid

import torch

from teeshard.model.sampling import SamplingParams
from teeshard.transport.codec import tensor_from_wire
from teeshard.transport.messages import CloseMsg, OpenMsg, StepMsg, WireDtype
from teeshard.transport.peer import PeerClient


class PipelineClient:
    def __init__(self, ws_url: str, max_frame_bytes: int = 64 << 20) -> None:
        self.peer = PeerClient(ws_url, max_frame_bytes=max_frame_bytes, request_timeout=60)

    async def open_session(
        self,
        max_len: int,
        sampling: SamplingParams | None = None,
        return_logits: bool = True,
        wire_dtype: WireDtype = "float32",
    ) -> str:
        session = uuid.uuid4().hex
        await self.peer.request(
            lambda rid: OpenMsg(
                id=rid,
                session=session,
                max_len=max_len,
                sampling=sampling or SamplingParams(),
                return_logits=return_logits,
                wire_dtype=wire_dtype,
            )
        )
        return session

    async def step(self, session: str, tokens: list[int]) -> tuple[int, torch.Tensor | None]:
        reply = await self.peer.request(
            lambda rid: StepMsg(id=rid, session=session, tokens=tuple(tokens))
        )
        assert reply.token is not None
        return reply.token, tensor_from_wire(reply.logits) if reply.logits is not None else None

    async def close_session(self, session: str, sign: bool = False) -> list[dict[str, object]]:
        """Close the session; with ``sign``, return every stage's receipt (JSON form)."""
        reply = await self.peer.request(lambda rid: CloseMsg(id=rid, session=session, sign=sign))
        return [r.model_dump() for r in reply.receipts]

    async def disconnect(self) -> None:
        await self.peer.disconnect()
