"""Raw frames on a node's pipeline socket, to send what a correct upstream never would.

By default the socket first introduces itself as an attested upstream (a
stand-in with the previous node's layers and manifest, see
``LocalCluster.upstream_of``): only those get to send frames at all. With
``introduce=False`` it is a stranger, for the attacks.
"""

from __future__ import annotations

import ssl
import uuid
from typing import Any

import msgpack
import torch
from websockets.asyncio.client import connect

from teeshard.server.trust import NodeTrust
from teeshard.transport.codec import encode, tensor_to_wire
from teeshard.transport.messages import OpenMsg, StepMsg, WireTensor
from teeshard.transport.peer import introduce_over
from tests.cluster import LocalCluster


class PipelineSocket:
    def __init__(self, url: str, tls: ssl.SSLContext | None, upstream: NodeTrust | None) -> None:
        self.url = url
        self.tls = tls
        self.upstream = upstream
        self.ids = iter(range(1, 10_000))

    @classmethod
    def to(cls, cluster: LocalCluster, index: int = 1, introduce: bool = True) -> PipelineSocket:
        node = cluster.nodes[index]
        upstream = cluster.upstream_of(index) if introduce else None
        return cls(node.ws_url, node.client_ssl(), upstream)

    async def __aenter__(self) -> PipelineSocket:
        self.ws = await connect(self.url, ssl=self.tls, max_size=None, compression=None)
        if self.upstream is not None:
            await introduce_over(self.ws, self.upstream.introduce, 10, self.url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ws.close()

    async def send_raw(self, frame: bytes | str) -> dict[str, Any]:
        await self.ws.send(frame)
        return await self.receive()

    async def receive(self) -> dict[str, Any]:
        return dict(msgpack.unpackb(await self.ws.recv()))

    def open_frame(self, max_len: int, session: str | None = None) -> tuple[str, bytes]:
        msg = OpenMsg(id=next(self.ids), session=session or uuid.uuid4().hex, max_len=max_len)
        return msg.session, encode(msg)

    def step_frame(self, session: str, **fields: Any) -> bytes:
        return encode(StepMsg(id=next(self.ids), session=session, **fields))

    async def open(self, max_len: int, session: str | None = None) -> dict[str, Any]:
        session, frame = self.open_frame(max_len, session)
        reply = await self.send_raw(frame)
        reply["session"] = session
        return reply

    async def step(self, session: str, **fields: Any) -> dict[str, Any]:
        return await self.send_raw(self.step_frame(session, **fields))


def hidden(steps: int, width: int = 64, dtype: str = "float32") -> WireTensor:
    return tensor_to_wire(torch.randn(1, steps, width), dtype)
