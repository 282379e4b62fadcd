"""The downstream hop: this stage's links to the next node of each session's route.

A pool of attested, persistent connections keyed by node URL (``PeerClient``
verifies the node's attestation with this node's policy, and that its layers
start where this node's end, before every (re)connection) carries ``open``,
``step`` and ``close`` for every session of this stage; a session's route names
its next node in ``open``, or it uses the node's ``--next``. This module builds
those messages and maps what can go wrong to node errors:

- the next node answered with an error: its code and status are kept (a 503
  when it is full stays a 503);
- its certificate is not the attested one, or it refused this node's own
  attestation: ``attestation_failed`` (502);
- it cannot be reached or the link broke: ``downstream_failed`` (502), naming
  the URL of the node that failed (the entry node routes around it); a later
  hop's ``downstream_failed`` keeps the URL that hop named.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from teeshard.attest import Receipt
from teeshard.model.sampling import SamplingParams, TokenLogprobs
from teeshard.node.errors import BadRequestError, DownstreamError, NodeError
from teeshard.transport.codec import tensor_from_wire
from teeshard.transport.messages import (
    CloseMsg,
    OpenMsg,
    ReceiptWire,
    ResultMsg,
    SamplingHistory,
    StepMsg,
    WireDtype,
    WireTensor,
    logprobs_from_wire,
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
    logprobs: TokenLogprobs | None = None  # when the session's sampling asked for them


def node_url(url: str) -> str:
    """How a node is named in routes, errors and registries: ``wss://host:port``.

    Accepts the full pipeline URL (``.../pipeline``) too.
    """
    base = url.rstrip("/")
    return base.removesuffix("/pipeline").rstrip("/")


# Makes the attested client for one downstream node (``wss://host:port``); the client
# verifies that node with this node's policy before every (re)connection.
PeerFactory = Callable[[str], PeerClient]


class NextHop:
    """A pool of attested connections to downstream nodes, keyed by their URL.

    ``default_url`` is the node's ``--next``: used by sessions whose ``open`` named no
    route (a static chain). Every other session names its next node in ``open``.
    """

    def __init__(
        self, connect: PeerFactory, default_url: str | None = None, max_peers: int = 64
    ) -> None:
        self._connect = connect
        self.default_url = node_url(default_url) if default_url is not None else None
        self.max_peers = max_peers
        self._peers: dict[str, PeerClient] = {}
        self._closing: set[asyncio.Future[None]] = set()  # disconnects of evicted peers

    @property
    def connected(self) -> bool:
        return any(p.connected for p in self._peers.values())

    def peer(self, url: str) -> PeerClient:
        """The cached client for ``url``, made (not yet connected) on first use."""
        url = node_url(url)
        client = self._peers.get(url)
        if client is None:
            if len(self._peers) >= self.max_peers:
                idle = [u for u, p in self._peers.items() if not p.stats()["in_flight"]]
                if not idle:
                    raise DownstreamError(
                        f"this node already links to {self.max_peers} downstream nodes",
                        code="overloaded",
                        status=503,
                    )
                stale = self._peers.pop(idle[0])
                task = asyncio.ensure_future(stale.disconnect())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
            client = self._peers[url] = self._connect(url)
        return client

    async def open_session(
        self,
        session_id: str,
        max_len: int,
        sampling: SamplingParams,
        wire_dtype: WireDtype,
        return_logits: bool,
        route: tuple[str, ...] = (),
        history: SamplingHistory | None = None,
    ) -> tuple[str, tuple[str, ...]]:
        """Open the session on every later node: at ``route[0]`` (passing the rest of
        ``route`` on), or at the default next node when ``route`` is empty.

        Returns the URL of the next node and the node ids of every later node.
        """
        url = node_url(route[0]) if route else self.default_url
        if url is None:
            raise BadRequestError(
                "this node has no --next: open must name the route of the nodes after it",
                code="route_required",
            )
        reply = await self._request(
            url,
            lambda rid: OpenMsg(
                id=rid,
                session=session_id,
                max_len=max_len,
                wire_dtype=wire_dtype,
                sampling=sampling,
                return_logits=return_logits,
                route=route[1:],
                history=history,
            ),
        )
        return url, reply.route

    async def step(
        self,
        url: str,
        session_id: str,
        hidden: WireTensor,
        on_frame: Callable[[bytes], None],
        allowed: bytes | None = None,
    ) -> HopStep:
        """Send hidden states on (with the step's allowed-token mask, unchanged);
        ``on_frame`` sees the exact bytes sent (for the receipt)."""
        reply = await self._request(
            url,
            lambda rid: StepMsg(id=rid, session=session_id, hidden=hidden, allowed=allowed),
            on_frame,
        )
        if reply.token is None:
            raise DownstreamError("next node returned a step result without a token")
        logits = tensor_from_wire(reply.logits) if reply.logits is not None else None
        logprobs = None
        if reply.logprobs is not None:
            try:
                logprobs = logprobs_from_wire(reply.token, reply.logprobs)
            except ValueError as exc:
                raise DownstreamError(f"next node returned bad logprobs: {exc}") from None
        return HopStep(reply.token, logits, logprobs)

    async def close_session(
        self, url: str, session_id: str, receipt: Receipt | None
    ) -> list[Receipt]:
        """Close downstream; with ``receipt`` (this stage's), collect every later stage's.

        Failures are logged, not raised: the session is gone here either way.
        """
        wire = ReceiptWire(**receipt.to_json()) if receipt is not None else None
        try:
            reply = await self._request(
                url,
                lambda rid: CloseMsg(
                    id=rid, session=session_id, sign=wire is not None, receipt=wire
                ),
            )
            return [Receipt.from_json(r.model_dump()) for r in reply.receipts]
        except NodeError as exc:
            log.info("a downstream close failed: %s", exc.code)
            return []

    async def keep_connected(self) -> None:
        """Connect to the default next node now so problems show at start; retry with
        backoff until connected. Requests also (re)connect lazily."""
        if self.default_url is None:
            return
        peer = self.peer(self.default_url)
        delay = 0.5
        while not peer.connected:
            try:
                await peer.connect()
            except (PeerError, NodeError) as exc:
                log.warning("next node not ready (%s); retrying in %.0fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def disconnect(self) -> None:
        peers, self._peers = list(self._peers.values()), {}
        for peer in peers:
            await peer.disconnect()

    def stats(self) -> dict[str, Any]:
        return {
            "default": self.default_url,
            "peers": [{**p.stats(), "url": u} for u, p in self._peers.items()],
        }

    async def _request(
        self,
        url: str,
        build: Callable[[int], OpenMsg | StepMsg | CloseMsg],
        on_frame: Callable[[bytes], None] | None = None,
    ) -> ResultMsg:
        """One request to ``url``; every failure names the node that failed."""
        try:
            return await self.peer(url).request(build, on_frame)
        except RemoteError as exc:
            if exc.code == DownstreamError.code:  # a later hop lost its peer: it named it
                raise DownstreamError(f"next node: {exc}", node=exc.node) from None
            raise NodeError(f"next node: {exc}", code=exc.code, status=exc.status) from None
        except (PeerCertificateError, PeerRefusedError) as exc:
            raise DownstreamError(
                f"next node refused: {exc}", code="attestation_failed", node=url
            ) from None
        except PeerError as exc:
            raise DownstreamError(f"next node unavailable: {exc}", node=url) from None
        except DownstreamError as exc:  # from attesting the next node before connecting
            if exc.node is None:
                exc.node = url
            raise
