"""Frames to messages and tensors to bytes, with every check done before use."""

from __future__ import annotations

import sys

import msgpack
import torch
from pydantic import TypeAdapter, ValidationError

from teeshard.transport.messages import WIRE_DTYPES, Message, WireTensor

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("teeshard's wire format assumes a little-endian host")

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MESSAGE = TypeAdapter(Message)


class ProtocolError(ValueError):
    """A frame that is not a valid message, or a tensor that does not match its header."""

    def __init__(self, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id  # known when the frame parsed but did not validate


def encode(message: Message) -> bytes:
    return msgpack.packb(message.model_dump(), use_bin_type=True)


def decode(frame: bytes) -> Message:
    if not isinstance(frame, bytes | bytearray | memoryview):
        raise ProtocolError("pipeline frames must be binary")
    try:
        raw = msgpack.unpackb(frame, raw=False, use_list=False, strict_map_key=True)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as exc:
        raise ProtocolError(f"frame is not valid msgpack: {exc}") from None
    if not isinstance(raw, dict):
        raise ProtocolError("frame must be a msgpack map")
    request_id = raw.get("id") if isinstance(raw.get("id"), int) else None
    if raw.get("v") != 1:
        raise ProtocolError(
            f"unsupported protocol version {raw.get('v')!r} (this node speaks 1)", request_id
        )
    try:
        return _MESSAGE.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        kind = raw.get("type", "message")
        raise ProtocolError(
            f"invalid {kind!s} message: {where}: {first['msg']}", request_id
        ) from None


def tensor_to_wire(tensor: torch.Tensor, dtype: str) -> WireTensor:
    data = tensor.detach().to(device="cpu", dtype=_TORCH_DTYPES[dtype]).contiguous()
    return WireTensor(
        dtype=dtype, shape=tuple(data.shape), data=data.view(torch.uint8).numpy().tobytes()
    )


def tensor_from_wire(wire: WireTensor, expected_dtype: str | None = None) -> torch.Tensor:
    """Rebuild a tensor, refusing unknown dtypes and byte counts that do not fit the shape."""
    if wire.dtype not in WIRE_DTYPES:
        raise ProtocolError(f"tensor dtype {wire.dtype!r} is not one of {', '.join(WIRE_DTYPES)}")
    if expected_dtype is not None and wire.dtype != expected_dtype:
        raise ProtocolError(
            f"tensor dtype {wire.dtype} does not match the session's {expected_dtype}"
        )
    if any(dim < 0 for dim in wire.shape):
        raise ProtocolError(f"negative dimension in shape {wire.shape}")
    torch_dtype = _TORCH_DTYPES[wire.dtype]
    count = 1
    for dim in wire.shape:
        count *= dim
    itemsize = torch.empty(0, dtype=torch_dtype).element_size()
    if count * itemsize != len(wire.data):
        raise ProtocolError(
            f"tensor of shape {wire.shape} and dtype {wire.dtype} needs {count * itemsize} bytes, "
            f"got {len(wire.data)}"
        )
    if count == 0:
        return torch.empty(wire.shape, dtype=torch_dtype)
    # bytearray: torch wants a writable buffer; the copy also frees the frame sooner.
    return torch.frombuffer(bytearray(wire.data), dtype=torch_dtype).view(wire.shape)
