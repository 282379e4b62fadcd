"""The simulated provider: INSECURE evidence signed by a software key, for development.

It proves nothing about hardware: anyone can run it and sign anything. It exists so
that the whole attestation path (binding, manifest, nonce, receipts, pinning) runs
on machines without a TEE. Its evidence is marked ``insecure`` and every verifier
refuses it unless explicitly allowed (``allow_simulated`` / ``--allow-simulated``).

Format of the "quote" (all lengths fixed)::

    MAGIC (27 bytes, "TEESHARD-SIMULATED-INSECURE") || 0x00 || version (1 byte, 1)
    || report_data (64) || Ed25519 public key (32) || Ed25519 signature (64)

The signature covers everything before the public key. The key is ephemeral, or
persisted in a node data directory so a verifier can pin it across restarts.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from teeshard.attest.errors import FormatError, SignatureError
from teeshard.attest.evidence import REPORT_DATA_SIZE, Evidence
from teeshard.attest.providers.base import check_report_data

log = logging.getLogger(__name__)

MAGIC = b"TEESHARD-SIMULATED-INSECURE"
VERSION = 1
KEY_FILE = "simulated-attestation-key.pem"
_HEADER = MAGIC + b"\0" + bytes([VERSION])
_SIZE = len(_HEADER) + REPORT_DATA_SIZE + 32 + 64


class SimulatedProvider:
    name = "simulated"

    def __init__(self, key: ed25519.Ed25519PrivateKey | None = None) -> None:
        self._key = key or ed25519.Ed25519PrivateKey.generate()
        log.warning("simulated TEE provider: evidence is INSECURE and proves nothing")

    @classmethod
    def from_data_dir(cls, data_dir: str | Path) -> SimulatedProvider:
        """Load the signing key from ``data_dir``, creating it (mode 0600) the first time."""
        return cls(_load_or_create_key(Path(data_dir) / KEY_FILE))

    @property
    def public_key(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def quote(self, report_data: bytes) -> Evidence:
        signed = _HEADER + check_report_data(report_data)
        quote = signed + self.public_key + self._key.sign(signed)
        return Evidence(self.name, "simulated", quote, report_data, None, insecure=True)


def simulated_public_key(data_dir: str | Path) -> bytes:
    """The public key the simulated provider of ``data_dir`` signs with (created if absent).

    For a policy that accepts this machine's simulated nodes and no one else's:
    ``simulated_keys = ["<hex of this>"]``. Pass the directory the node's provider
    uses (``select_provider(data_dir=...)``).
    """
    key = _load_or_create_key(Path(data_dir) / KEY_FILE)
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _load_or_create_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """The key at ``path``; made first if absent. Safe when several nodes start at once."""
    if not path.exists():
        pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
            handle.write(pem)
        try:
            os.link(partial, path)  # atomic, and never replaces a key another node made
        except FileExistsError:
            pass
        finally:
            partial.unlink()
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, ed25519.Ed25519PrivateKey):
        raise FormatError(f"{path} does not hold an Ed25519 key")
    return loaded


@dataclass(frozen=True)
class SimulatedQuote:
    report_data: bytes
    public_key: bytes  # raw Ed25519; the only "measurement" a simulated quote has


def verify_simulated_quote(quote: bytes) -> SimulatedQuote:
    """Parse a simulated quote and check its self-signature (which proves only integrity)."""
    if not quote.startswith(MAGIC):
        raise FormatError("not a simulated quote (missing TEESHARD-SIMULATED-INSECURE prefix)")
    if len(quote) != _SIZE or quote[: len(_HEADER)] != _HEADER:
        raise FormatError("malformed simulated quote")
    split = len(_HEADER) + REPORT_DATA_SIZE
    signed, public, signature = quote[:split], quote[split : split + 32], quote[split + 32 :]
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public).verify(signature, signed)
    except InvalidSignature:
        raise SignatureError("simulated quote: signature does not verify") from None
    return SimulatedQuote(signed[len(_HEADER) :], public)
