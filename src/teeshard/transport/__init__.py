"""The node-to-node wire: strict msgpack messages, raw tensors, one multiplexed socket.

Errors::

    ProtocolError        a frame that does not decode or validate (never executed)
    PeerError            the next node is unreachable or the link broke
     ├── PeerCertificateError   its certificate is not the attested one
     └── PeerRefusedError       it refused this node's introduction (attestation)
    RemoteError          the next node answered with an error message
"""

from teeshard.transport.codec import (
    ProtocolError,
    decode,
    encode,
    tensor_from_wire,
    tensor_to_wire,
)
from teeshard.transport.messages import (
    CHALLENGE_BYTES,
    WIRE_DTYPES,
    ChallengeMsg,
    CloseMsg,
    ErrorMsg,
    IntroduceMsg,
    LogprobsWire,
    Message,
    OpenMsg,
    ReceiptWire,
    ResultMsg,
    SamplingHistory,
    StepMsg,
    StrictModel,
    WireDtype,
    WireTensor,
    logprobs_from_wire,
    logprobs_to_wire,
)
from teeshard.transport.peer import (
    Introducer,
    PeerCertificateError,
    PeerClient,
    PeerError,
    PeerRefusedError,
    RemoteError,
    introduce_over,
)

__all__ = [
    "CHALLENGE_BYTES",
    "WIRE_DTYPES",
    "ChallengeMsg",
    "CloseMsg",
    "ErrorMsg",
    "IntroduceMsg",
    "Introducer",
    "LogprobsWire",
    "Message",
    "OpenMsg",
    "PeerCertificateError",
    "PeerClient",
    "PeerError",
    "PeerRefusedError",
    "ProtocolError",
    "ReceiptWire",
    "RemoteError",
    "ResultMsg",
    "SamplingHistory",
    "StepMsg",
    "StrictModel",
    "WireDtype",
    "WireTensor",
    "decode",
    "encode",
    "introduce_over",
    "logprobs_from_wire",
    "logprobs_to_wire",
    "tensor_from_wire",
    "tensor_to_wire",
]
