"""CURVE key pairs of accelerators (and of nodes), and the fingerprint that is attested.

Files are ZeroMQ's own certificate format (``zmq.auth.create_certificates``):
``NAME.key`` holds the public key, ``NAME.key_secret`` both. A node pins the
accelerator's public key, given as the Z85 text or the path of either file; the
fingerprint attested in the node's manifest is SHA-256 of the raw 32-byte key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from teeshard.offload.errors import OffloadConfigError


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # Z85, 40 bytes
    secret: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public)


def create_key_files(directory: Path, name: str = "accel") -> tuple[Path, Path]:
    """Write ``NAME.key`` and ``NAME.key_secret`` (mode 0600) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    Path(secret).chmod(0o600)
    return Path(public), Path(secret)


def load_key_pair(path: Path) -> KeyPair:
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise OffloadConfigError(f"cannot read the CURVE key file {path}: {exc}") from None
    if secret is None:
        raise OffloadConfigError(f"{path} holds no secret key (use the .key_secret file)")
    return KeyPair(public, secret)


def parse_public_key(text: str) -> bytes:
    """A Z85 public key, or the path of a key file holding one."""
    candidate = Path(text)
    if len(text) != 40 or candidate.is_file():
        try:
            public, _ = zmq.auth.load_certificate(str(candidate))
        except (OSError, ValueError) as exc:
            raise OffloadConfigError(
                f"--accel-key {text!r}: neither a 40-character Z85 key nor a key file ({exc})"
            ) from None
        return bytes(public)
    key = text.encode()
    try:
        raw = zmq.utils.z85.decode(key)
    except (ValueError, KeyError):
        raise OffloadConfigError(f"--accel-key {text!r} is not a Z85 key") from None
    if len(raw) != 32:
        raise OffloadConfigError(f"--accel-key {text!r} is not a 32-byte CURVE key")
    return key


def fingerprint(public_z85: bytes) -> str:
    """SHA-256 of the raw 32-byte public key, hex: what manifests and receipts show."""
    return hashlib.sha256(zmq.utils.z85.decode(public_z85)).hexdigest()
