"""Pipeline wire messages, node to node.

Every frame is one msgpack map ``{"v": 1, "type": ..., "id": ..., ...}``. Models
are frozen and reject unknown fields; a frame that does not validate is answered
with an ``error`` message, never executed. Tensors travel as dtype, shape and raw
little-endian bytes; nothing received is ever unpickled.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from teeshard.model.sampling import (
    MAX_LOGPROBS,
    MAX_TOP_K,
    SamplingParams,
    TokenLogprobs,
    mask_bytes,
)

WIRE_DTYPES = ("float32", "float16", "bfloat16")
WireDtype = Literal["float32", "float16", "bfloat16"]

SessionId = Annotated[str, Field(min_length=1, max_length=128)]
RequestId = Annotated[int, Field(ge=0)]
# A hop of a route: the wss:// URL of a node's pipeline (hidden states go only over RA-TLS).
HopUrl = Annotated[str, Field(min_length=7, max_length=512, pattern=r"^wss://[^\s]+$")]
MAX_ROUTE_HOPS = 64


class StrictModel(BaseModel):
    """Every wire message: frozen, unknown fields refused, no type coercion."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class WireTensor(StrictModel):
    dtype: str
    shape: tuple[int, ...]
    data: bytes


MAX_HISTORY_TOKENS = 1 << 20
TokenId = Annotated[int, Field(ge=0)]  # ids past the vocabulary are ignored by the sampler


class SamplingHistory(StrictModel):
    """What the last node's sampling needs of a session's past, sent in ``open`` only when
    its parameters use it (``SamplingParams.needs_prompt`` / ``needs_output``): the
    distinct token ids of the prompt (repetition penalty), and the completion tokens
    produced before a failover rebuilt the session on this route, in order."""

    prompt_tokens: Annotated[tuple[TokenId, ...], Field(max_length=MAX_HISTORY_TOKENS)] = ()
    output_tokens: Annotated[tuple[TokenId, ...], Field(max_length=MAX_HISTORY_TOKENS)] = ()


class LogprobsWire(StrictModel):
    """The raw log-probability of a sampled token and its top alternatives (last node up)."""

    logprob: float
    top_ids: Annotated[tuple[TokenId, ...], Field(max_length=MAX_LOGPROBS)] = ()
    top_logprobs: Annotated[tuple[float, ...], Field(max_length=MAX_LOGPROBS)] = ()


def logprobs_to_wire(value: TokenLogprobs) -> LogprobsWire:
    return LogprobsWire(
        logprob=value.logprob,
        top_ids=tuple(t for t, _ in value.top),
        top_logprobs=tuple(v for _, v in value.top),
    )


def logprobs_from_wire(token: int, wire: LogprobsWire) -> TokenLogprobs:
    if len(wire.top_ids) != len(wire.top_logprobs):
        raise ValueError("logprobs: as many top ids as top logprobs")
    return TokenLogprobs(
        token, wire.logprob, tuple(zip(wire.top_ids, wire.top_logprobs, strict=True))
    )


class OpenMsg(StrictModel):
    v: Literal[1] = 1
    type: Literal["open"] = "open"
    id: RequestId
    session: SessionId
    max_len: int = Field(ge=1)
    wire_dtype: WireDtype = "float32"  # chosen by the entry node; every node follows it
    sampling: SamplingParams = SamplingParams()
    return_logits: bool = False  # last node also returns float32 logits (tests, logprobs)
    # The nodes after the receiver, nearest first, chosen by the entry node for this
    # session; empty: the receiver uses its own ``--next`` (a static chain).
    route: Annotated[tuple[HopUrl, ...], Field(max_length=MAX_ROUTE_HOPS)] = ()
    history: SamplingHistory | None = None  # for the last node's sampling (see above)


class StepMsg(StrictModel):
    v: Literal[1] = 1
    type: Literal["step"] = "step"
    id: RequestId
    session: SessionId
    tokens: tuple[int, ...] | None = None  # for a node whose range starts at layer 0
    hidden: WireTensor | None = None  # (1, T, hidden) for every other node
    # Grammar-constrained decoding: the tokens the last node may sample at the next
    # position, one bit per token id (``teeshard.model.sampling.unpack_allowed``). The
    # entry computes it; every hop passes it on unchanged and checks its length against
    # the vocabulary. None: every token is allowed.
    allowed: Annotated[bytes, Field(min_length=1, max_length=mask_bytes(MAX_TOP_K))] | None = None


class ReceiptWire(StrictModel):
    """A signed stage receipt (``teeshard.attest.receipts.Receipt``), hex fields as text."""

    request_id: str
    stage: int
    layers: str
    model_layers: int  # the model's layer count the signer's manifest states (0: none)
    positions: int  # token positions the stage ran for the request: what credit counts
    manifest_hash: str
    received_sha256: str
    sent_sha256: str
    previous_hash: str
    signer: str
    signature: str


class CloseMsg(StrictModel):
    v: Literal[1] = 1
    type: Literal["close"] = "close"
    id: RequestId
    session: SessionId
    # The session finished normally: every stage signs its receipt, linked to the
    # upstream stage's (``receipt``; None when this node is stage 0).
    sign: bool = False
    receipt: ReceiptWire | None = None


class ResultMsg(StrictModel):
    v: Literal[1] = 1
    type: Literal["result"] = "result"
    id: RequestId
    token: int | None = None  # sampled token id (step results)
    logits: WireTensor | None = None
    logprobs: LogprobsWire | None = None  # of ``token``, when the session's sampling asked
    route: tuple[str, ...] = ()  # open results: node ids of this node and every node after it
    receipts: tuple[ReceiptWire, ...] = ()  # close results: this stage's receipt and later ones


class ErrorMsg(StrictModel):
    v: Literal[1] = 1
    type: Literal["error"] = "error"
    id: RequestId | None
    code: str  # machine-readable, see teeshard.node.errors
    message: str
    status: int = 500  # the HTTP status the entry node should give a client
    # downstream_failed: the URL of the node that failed, as the hop that lost it names it
    node: str | None = None


# -- the handshake: an upstream proves what it is before it may send anything ---------

CHALLENGE_BYTES = 32
MAX_INTRODUCTION_BYTES = 1 << 20  # an attestation bundle: quote, event log, manifest


class ChallengeMsg(StrictModel):
    """Downstream to upstream, first frame of every connection: a fresh nonce."""

    v: Literal[1] = 1
    type: Literal["challenge"] = "challenge"
    nonce: Annotated[bytes, Field(min_length=CHALLENGE_BYTES, max_length=CHALLENGE_BYTES)]


class IntroduceMsg(StrictModel):
    """Upstream to downstream: its attestation bundle (JSON) for a nonce derived from the
    challenge and the downstream's certificate, so it proves this very connection."""

    v: Literal[1] = 1
    type: Literal["introduce"] = "introduce"
    bundle: Annotated[bytes, Field(max_length=MAX_INTRODUCTION_BYTES)]


Request = OpenMsg | StepMsg | CloseMsg
Reply = ResultMsg | ErrorMsg
Message = Annotated[
    OpenMsg | StepMsg | CloseMsg | ResultMsg | ErrorMsg | ChallengeMsg | IntroduceMsg,
    Field(discriminator="type"),
]
