"""Wire messages between a TEE node and its accelerator: msgpack maps over ZeroMQ.

Every frame is ``{"v": 1, "type": ..., "id": ..., ...}``; models are frozen and
reject unknown fields. Tensors travel as dtype, shape and raw little-endian
bytes (float32 activations in plain mode, int64 field elements otherwise);
nothing received is unpickled. The node sends ``info``, ``matmul`` or ``embed``;
the accelerator answers ``info``, ``result`` or ``error`` with the same id.
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar

import msgpack
import torch
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from teeshard.transport.messages import StrictModel

TENSOR_DTYPES = {"float32": torch.float32, "int64": torch.int64}
Arith = Literal["float", "field"]  # float: plain products; field: exact products mod p
RequestId = Annotated[int, Field(ge=0)]
_T = TypeVar("_T")


class Tensor(StrictModel):
    dtype: Literal["float32", "int64"]
    shape: tuple[int, ...]
    data: bytes


class InfoRequest(StrictModel):
    v: Literal[1] = 1
    type: Literal["info"] = "info"
    id: RequestId


class MatmulRequest(StrictModel):
    v: Literal[1] = 1
    type: Literal["matmul"] = "matmul"
    id: RequestId
    group: Annotated[str, Field(min_length=1, max_length=64)]
    x: Tensor  # (T, K): float32 (float arith) or int64 residues (field arith)


class EmbedRequest(StrictModel):
    v: Literal[1] = 1
    type: Literal["embed"] = "embed"
    id: RequestId
    tokens: tuple[int, ...]


class InfoReply(StrictModel):
    v: Literal[1] = 1
    type: Literal["info"] = "info"
    id: RequestId
    model: str
    layers: str
    arith: Arith
    device: str
    groups: dict[str, tuple[int, int]]  # name -> (out_features, in_features)


class ResultReply(StrictModel):
    v: Literal[1] = 1
    type: Literal["result"] = "result"
    id: RequestId
    y: Tensor


class ErrorReply(StrictModel):
    v: Literal[1] = 1
    type: Literal["error"] = "error"
    id: RequestId
    message: str


Request = Annotated[InfoRequest | MatmulRequest | EmbedRequest, Field(discriminator="type")]
Reply = Annotated[InfoReply | ResultReply | ErrorReply, Field(discriminator="type")]
_REQUEST: TypeAdapter[InfoRequest | MatmulRequest | EmbedRequest] = TypeAdapter(Request)
_REPLY: TypeAdapter[InfoReply | ResultReply | ErrorReply] = TypeAdapter(Reply)


class WireError(ValueError):
    """A frame that is not a valid message, or a tensor that does not fit its header."""

    def __init__(self, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


def encode(message: BaseModel) -> bytes:
    return msgpack.packb(message.model_dump(), use_bin_type=True)


def _unpack(frame: bytes) -> dict[str, object]:
    try:
        raw = msgpack.unpackb(frame, raw=False, use_list=False, strict_map_key=True)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as exc:
        raise WireError(f"frame is not valid msgpack: {exc}") from None
    if not isinstance(raw, dict):
        raise WireError("frame must be a msgpack map")
    return raw


def _validate(adapter: TypeAdapter[_T], frame: bytes) -> _T:
    raw = _unpack(frame)
    found = raw.get("id")
    request_id = found if isinstance(found, int) else None
    if raw.get("v") != 1:
        raise WireError(f"unsupported protocol version {raw.get('v')!r} (speaks 1)", request_id)
    try:
        return adapter.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise WireError(
            f"invalid {raw.get('type', 'message')!s}: {where}: {first['msg']}", request_id
        ) from None


def decode_request(frame: bytes) -> InfoRequest | MatmulRequest | EmbedRequest:
    return _validate(_REQUEST, frame)


def decode_reply(frame: bytes) -> InfoReply | ResultReply | ErrorReply:
    return _validate(_REPLY, frame)


def to_wire(tensor: torch.Tensor) -> Tensor:
    data = tensor.detach().to("cpu").contiguous()
    name: Literal["float32", "int64"]
    if data.dtype == torch.float32:
        name = "float32"
    elif data.dtype == torch.int64:
        name = "int64"
    else:
        raise WireError(f"tensor dtype {data.dtype} cannot travel to the accelerator")
    return Tensor(
        dtype=name, shape=tuple(data.shape), data=data.view(torch.uint8).numpy().tobytes()
    )


def from_wire(wire: Tensor, dims: int) -> torch.Tensor:
    """Rebuild a tensor of ``dims`` dimensions, refusing byte counts that do not fit."""
    if len(wire.shape) != dims or any(d < 0 for d in wire.shape):
        raise WireError(f"expected a {dims}-dimensional tensor, got shape {wire.shape}")
    dtype = TENSOR_DTYPES[wire.dtype]
    count = 1
    for dim in wire.shape:
        count *= dim
    if count * 4 * (2 if dtype == torch.int64 else 1) != len(wire.data):
        raise WireError(f"tensor of shape {wire.shape} ({wire.dtype}) has {len(wire.data)} bytes")
    if count == 0:
        return torch.empty(wire.shape, dtype=dtype)
    return torch.frombuffer(bytearray(wire.data), dtype=dtype).view(wire.shape)
