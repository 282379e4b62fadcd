"""Canonical byte encodings and strict JSON field parsing shared by the attest modules.

Everything that is hashed or signed is built from these few primitives, so two
implementations agree byte for byte: a domain tag ending in ``\\0``, then fields
as big-endian integers or length-prefixed byte strings. Length prefixes make the
encoding injective: no two different field lists encode to the same bytes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from typing import Any

from teeshard.attest.errors import FormatError


def u32(value: int) -> bytes:
    return struct.pack(">I", value)


def u64(value: int) -> bytes:
    return struct.pack(">Q", value)


def lp(data: bytes) -> bytes:
    """Length-prefixed bytes: ``u32(len) || data``."""
    return u32(len(data)) + data


def encode(domain: bytes, *parts: bytes) -> bytes:
    """``domain`` (must end in NUL) followed by already-encoded parts."""
    if not domain.endswith(b"\0"):
        raise ValueError("domain tags end with a NUL byte")
    return domain + b"".join(parts)


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON: sorted keys, no whitespace, ASCII only, no NaN."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def from_hex(text: object, field: str, length: int | None = None) -> bytes:
    """Decode a hex string field, refusing anything else (and wrong lengths)."""
    if not isinstance(text, str):
        raise FormatError(f"{field}: expected a hex string, got {type(text).__name__}")
    try:
        data = bytes.fromhex(text)
    except ValueError:
        raise FormatError(f"{field}: not valid hex") from None
    if length is not None and len(data) != length:
        raise FormatError(f"{field}: expected {length} bytes, got {len(data)}")
    return data


def check_fields(
    data: object, what: str, required: Iterable[str], optional: Iterable[str] = ()
) -> Mapping[str, Any]:
    """Return ``data`` as a mapping after checking it has exactly the allowed keys."""
    if not isinstance(data, Mapping):
        raise FormatError(f"{what}: expected a JSON object, got {type(data).__name__}")
    required_set = set(required)
    allowed = required_set | set(optional)
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise FormatError(f"{what}: unknown field(s) {', '.join(unknown)}")
    missing = sorted(required_set - set(data))
    if missing:
        raise FormatError(f"{what}: missing field(s) {', '.join(missing)}")
    return data


def get_str(data: Mapping[str, Any], key: str, what: str) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise FormatError(f"{what}.{key}: expected a string")
    return value


def get_int(data: Mapping[str, Any], key: str, what: str) -> int:
    value = data[key]
    # bool is an int subclass; a JSON true is not a number here.
    if not isinstance(value, int) or isinstance(value, bool):
        raise FormatError(f"{what}.{key}: expected an integer")
    return value


def get_bool(data: Mapping[str, Any], key: str, what: str) -> bool:
    value = data[key]
    if not isinstance(value, bool):
        raise FormatError(f"{what}.{key}: expected true or false")
    return value
