"""The node-to-node wire: strict msgpack messages, raw tensors, one multiplexed socket.

Errors::

    ProtocolError        a frame that does not decode or validate (never executed)
    PeerError            the next node is unreachable or the link broke
     └── PeerCertificateError   its certificate is not the attested one
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
    WIRE_DTYPES,
    CloseMsg,
    ErrorMsg,
    Message,
    OpenMsg,
    ReceiptWire,
    ResultMsg,
    StepMsg,
    WireDtype,
    WireTensor,
)
from teeshard.transport.peer import PeerCertificateError, PeerClient, PeerError, RemoteError
from teeshard.transport.pipeline_client import PipelineClient

__all__ = [
    "WIRE_DTYPES",
    "CloseMsg",
    "ErrorMsg",
    "Message",
    "OpenMsg",
    "PeerCertificateError",
    "PeerClient",
    "PeerError",
    "PipelineClient",
    "ProtocolError",
    "ReceiptWire",
    "RemoteError",
    "ResultMsg",
    "StepMsg",
    "WireDtype",
    "WireTensor",
    "decode",
    "encode",
    "tensor_from_wire",
    "tensor_to_wire",
]
