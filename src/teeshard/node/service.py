"""A shard node's sessions and steps: local compute, then the next hop.

The pipeline socket and the entry node's generation loop both drive a node
through this class. Compute runs on one worker thread (torch uses all cores
inside each op), so the event loop stays free for I/O while a step runs.

Error handling: a step that fails downstream rolls the local cache back, so the
session is exactly as before the step; a failed ``open`` downstream closes the
local session again. Errors from the next node keep their code and status.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

from teeshard.attest.attester import NodeAttestation
from teeshard.attest.receipts import Receipt
from teeshard.model.transformer import Shard
from teeshard.node.compute import StepOutput, check_hidden, check_tokens, run_step
from teeshard.node.errors import DownstreamError, NodeError
from teeshard.node.metrics import Metrics
from teeshard.node.sessions import Session, SessionLimits, SessionStore
from teeshard.transport.codec import ProtocolError, tensor_from_wire, tensor_to_wire
from teeshard.transport.messages import (
    CloseMsg,
    OpenMsg,
    ReceiptWire,
    ResultMsg,
    SamplingParams,
    StepMsg,
)
from teeshard.transport.peer import PeerCertificateError, PeerClient, PeerError, RemoteError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class StepResult:
    token: int
    logits: torch.Tensor | None = None  # (vocab,) float32 when the session asked for them


class NodeService:
    def __init__(
        self,
        shard: Shard,
        model_name: str,
        limits: SessionLimits,
        downstream: PeerClient | None = None,
        node_id: str = "node",
        attestation: NodeAttestation | None = None,
    ) -> None:
        if not shard.is_last and downstream is None:
            raise ValueError(
                f"layers {shard.layer_range} do not end the model ({shard.spec.num_layers} layers): "
                "a next node (--next) is required"
            )
        self.shard = shard
        self.model_name = model_name
        self.node_id = node_id
        self.attestation = attestation  # signs this stage's receipts; None: no receipts
        self.downstream = downstream if not shard.is_last else None
        self.sessions = SessionStore(limits, shard.spec.max_position_embeddings)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self._locks: dict[str, asyncio.Lock] = {}
        self.metrics = Metrics({"model": model_name, "layers": str(shard.layer_range)})
        self.metrics.counter("teeshard_steps_total", "Pipeline steps run on this node")
        self.metrics.counter(
            "teeshard_tokens_processed_total", "Token positions run through this shard"
        )
        self.metrics.counter("teeshard_step_seconds_total", "Time spent in local compute")
        self.metrics.counter("teeshard_errors_total", "Failed requests by error code")
        self.metrics.counter("teeshard_pipeline_connections_total", "Pipeline sockets accepted")
        self.metrics.gauge("teeshard_sessions_open", "Open sessions", lambda: len(self.sessions))
        self.metrics.gauge(
            "teeshard_cache_reserved_tokens",
            "KV positions reserved",
            lambda: self.sessions.reserved_tokens,
        )

    # -- sessions --------------------------------------------------------------------

    async def open(
        self,
        session_id: str,
        max_len: int,
        sampling: SamplingParams,
        wire_dtype: str = "float32",
        return_logits: bool = False,
        input_digest: bytes | None = None,
    ) -> tuple[str, ...]:
        """Open a session here and on every later node; return the ids of the chain.

        ``input_digest`` (entry node) is what its receipt says it received: the
        SHA-256 of the client's request body.
        """
        session = self.sessions.open(
            session_id, max_len, self.shard.new_cache, wire_dtype, sampling, return_logits
        )
        session.input_digest = input_digest
        if self.downstream is None:
            return (self.node_id,)
        try:
            reply = await self._downstream(
                lambda rid: OpenMsg(
                    id=rid,
                    session=session_id,
                    max_len=max_len,
                    wire_dtype=wire_dtype,  # type: ignore[arg-type]
                    sampling=sampling,
                    return_logits=return_logits,
                )
            )
        except BaseException:
            self.sessions.close(session_id)
            raise
        return (self.node_id, *reply.chain)

    async def close(
        self, session_id: str, *, sign: bool = False, previous: Receipt | None = None
    ) -> list[Receipt] | None:
        """Close here and downstream; with ``sign``, return the receipt chain from here on.

        ``sign`` is for a session that finished normally: this node signs its receipt
        (linked to ``previous``, the upstream stage's) and passes it on, and every
        later node does the same. Returns None when the session was not open here.
        Downstream failures are logged, not raised: the session is gone either way.
        """
        session = self.sessions.close(session_id)
        self._locks.pop(session_id, None)
        own = self._sign(session, previous) if sign and session is not None else None
        later: list[Receipt] = []
        if self.downstream is not None:
            wire = ReceiptWire(**own.to_json()) if own is not None else None
            try:
                reply = await self._downstream(
                    lambda rid: CloseMsg(
                        id=rid, session=session_id, sign=wire is not None, receipt=wire
                    )
                )
                later = [Receipt.from_json(r.model_dump()) for r in reply.receipts]
            except NodeError as exc:
                log.info("close of session %s downstream failed: %s", session_id, exc.code)
        if session is None:
            return None
        return [own, *later] if own is not None else []

    def _sign(self, session: Session, previous: Receipt | None) -> Receipt | None:
        if self.attestation is None:
            return None
        received = session.input_digest or session.received.digest()
        return self.attestation.sign_receipt(
            request_id=session.id,
            stage=previous.stage + 1 if previous is not None else 0,
            received_sha256=received,
            sent_sha256=session.sent.digest(),
            previous=previous,
        )

    def evict_idle(self) -> list[str]:
        evicted = self.sessions.evict_idle()
        for session_id in evicted:
            self._locks.pop(session_id, None)
            log.info("evicted idle session %s", session_id)
        return evicted

    # -- steps -----------------------------------------------------------------------

    async def step_tokens(
        self, session_id: str, tokens: list[int] | tuple[int, ...], frame: bytes | None = None
    ) -> StepResult:
        session = self.sessions.get(session_id)
        inputs = check_tokens(self.shard, session, tokens)
        return await self._step(session, tokens=inputs, hidden=None, frame=frame)

    async def step_wire(self, message: StepMsg, frame: bytes) -> StepResult:
        """A step that arrived on the pipeline socket as ``frame``."""
        if message.hidden is None:
            return await self.step_tokens(message.session, message.tokens or (), frame)
        session = self.sessions.get(message.session)
        try:
            hidden = tensor_from_wire(message.hidden, expected_dtype=session.wire_dtype)
        except ProtocolError as exc:
            raise NodeError(str(exc), code="bad_request", status=400) from None
        hidden = check_hidden(self.shard, session, hidden)
        return await self._step(session, tokens=None, hidden=hidden, frame=frame)

    async def _step(
        self,
        session: Session,
        *,
        tokens: torch.Tensor | None,
        hidden: torch.Tensor | None,
        frame: bytes | None,
    ) -> StepResult:
        lock = self._locks.setdefault(session.id, asyncio.Lock())
        async with lock:  # one step at a time per session: the cache is sequential
            started = time.perf_counter()
            length_before = session.cache.length
            out: StepOutput = await self._compute(
                lambda: run_step(self.shard, session, tokens=tokens, hidden=hidden)
            )
            self.metrics.inc("teeshard_steps_total")
            self.metrics.inc(
                "teeshard_tokens_processed_total", session.cache.length - length_before
            )
            self.metrics.inc("teeshard_step_seconds_total", time.perf_counter() - started)
            if out.hidden is None:  # the last stage: its output is the token
                assert out.token is not None
                result = StepResult(out.token, out.logits)
                session.sent.update(struct.pack("<I", out.token))
            else:
                result = await self._forward(session, out.hidden, length_before)
            if frame is not None:
                session.received.update(frame)
            return result

    async def _forward(
        self, session: Session, hidden: torch.Tensor, length_before: int
    ) -> StepResult:
        wire = tensor_to_wire(hidden, session.wire_dtype)
        try:
            reply = await self._downstream(
                lambda rid: StepMsg(id=rid, session=session.id, hidden=wire),
                on_frame=session.sent.update,
            )
        except BaseException:
            session.cache.length = length_before  # keep the session consistent for a retry
            raise
        if reply.token is None:
            raise DownstreamError("next node returned a step result without a token")
        logits = tensor_from_wire(reply.logits) if reply.logits is not None else None
        return StepResult(reply.token, logits)

    async def _compute(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def _downstream(
        self,
        build: Callable[[int], OpenMsg | StepMsg | CloseMsg],
        on_frame: Callable[[bytes], None] | None = None,
    ) -> ResultMsg:
        assert self.downstream is not None
        try:
            return await self.downstream.request(build, on_frame)
        except RemoteError as exc:
            # the next node refused: keep its reason and status (e.g. 503 when it is full)
            raise NodeError(f"next node: {exc}", code=exc.code, status=exc.status) from None
        except PeerCertificateError as exc:
            raise DownstreamError(f"next node refused: {exc}", code="attestation_failed") from None
        except PeerError as exc:
            raise DownstreamError(f"next node unavailable: {exc}") from None

    def count_error(self, code: str) -> None:
        self.metrics.inc("teeshard_errors_total", code=code)

    async def shutdown(self) -> None:
        if self.downstream is not None:
            await self.downstream.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
