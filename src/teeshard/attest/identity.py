"""Node identity: a TLS key and certificate made inside the process, and certificate pinning.

At start a node generates an EC P-256 key, a short-lived self-signed certificate
for its host names, and an X25519 key for sealed (HPKE) requests. None of the
private keys ever leaves the process: the server TLS context loads the key from an
encrypted PEM (random in-memory password) in a private temporary file that is
deleted at once. The certificate is trusted by nobody on its own; it is trusted
because its public key is bound into the node's quote (see ``evidence.py``).

Peers then *pin* exactly that certificate: :func:`pinned_client_context` returns an
``ssl.SSLContext`` that accepts one certificate, by SHA-256 of its DER encoding,
and nothing else. It works with ``websockets.connect(url, ssl=ctx)``,
``httpx.Client(verify=ctx)`` and plain ``ssl`` sockets.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import os
import secrets
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.x509.oid import NameOID

from teeshard.attest.errors import FormatError, SignatureError

DEFAULT_VALIDITY = datetime.timedelta(days=7)


def load_certificate(pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise FormatError(f"unreadable certificate: {exc}") from None


def public_key_der(cert: x509.Certificate) -> bytes:
    """The certificate's DER SubjectPublicKeyInfo (what report_data commits to)."""
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def cert_fingerprint(cert: x509.Certificate | bytes) -> bytes:
    """SHA-256 of the certificate's DER encoding (``bytes`` input is DER)."""
    der = cert if isinstance(cert, bytes) else cert.public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).digest()


def verify_signature(cert: x509.Certificate, signature: bytes, message: bytes) -> None:
    """Check an ECDSA P-256 / SHA-256 signature by the certificate's key."""
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise SignatureError("the certificate's key is not an EC P-256 key")
    try:
        key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureError("signature does not verify under the certified key") from None


@dataclass(frozen=True)
class NodeIdentity:
    """A node's in-process keys. ``repr`` never shows key material."""

    private_key: ec.EllipticCurvePrivateKey = field(repr=False)
    certificate: x509.Certificate
    sealing_key: x25519.X25519PrivateKey = field(repr=False)

    @classmethod
    def generate(
        cls,
        hosts: Sequence[str] = ("localhost", "127.0.0.1"),
        validity: datetime.timedelta = DEFAULT_VALIDITY,
        now: datetime.datetime | None = None,
    ) -> NodeIdentity:
        """New keys and a self-signed certificate with SANs for ``hosts`` (names or IPs)."""
        key = ec.generate_private_key(ec.SECP256R1())
        start = (now or datetime.datetime.now(datetime.UTC)) - datetime.timedelta(minutes=5)
        # A unique subject: OpenSSL looks issuers up by name, and same-named anchors collide.
        common_name = f"teeshard node {secrets.token_hex(8)}"
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [x509.ExtendedKeyUsageOID.SERVER_AUTH, x509.ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(key, hashes.SHA256())
        return cls(key, cert, x25519.X25519PrivateKey.generate())

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def hosts(self) -> tuple[str, ...]:
        """The host names and IPs of the certificate (what :meth:`generate` was given)."""
        try:
            sans = self.certificate.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value
        except x509.ExtensionNotFound:
            return ()
        names = sans.get_values_for_type(x509.DNSName)
        return (*names, *(str(ip) for ip in sans.get_values_for_type(x509.IPAddress)))

    @property
    def validity(self) -> datetime.timedelta:
        """The certificate's whole lifetime."""
        return self.certificate.not_valid_after_utc - self.certificate.not_valid_before_utc

    def renewal_due(self, now: datetime.datetime | None = None, at: float = 0.8) -> bool:
        """True once the fraction ``at`` of the certificate's lifetime has passed."""
        now = now or datetime.datetime.now(datetime.UTC)
        return now >= self.certificate.not_valid_before_utc + self.validity * at

    @property
    def public_key_der(self) -> bytes:
        return public_key_der(self.certificate)

    @property
    def fingerprint(self) -> bytes:
        return cert_fingerprint(self.certificate)

    @property
    def sealing_public_key(self) -> bytes:
        return self.sealing_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def sign(self, message: bytes) -> bytes:
        """ECDSA P-256 / SHA-256 signature (DER) with the attested TLS key."""
        return self.private_key.sign(message, ec.ECDSA(hashes.SHA256()))

    def load_into(self, context: ssl.SSLContext) -> None:
        """Present this identity on ``context`` (replacing the one it presented before).

        Connections made after the call get this certificate; open ones keep theirs.
        """
        self._load_into(context)

    def _load_into(self, context: ssl.SSLContext) -> None:
        # ssl only loads keys from files: write an encrypted PEM with a random
        # password that stays in memory, load it, delete it.
        password = secrets.token_bytes(32)
        key_pem = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(password),
        )
        with tempfile.TemporaryDirectory(prefix="teeshard-tls-") as tmp:
            os.chmod(tmp, 0o700)
            cert_path, key_path = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
            with open(cert_path, "wb") as handle:
                handle.write(self.certificate_pem)
            with open(os.open(key_path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as handle:
                handle.write(key_pem)
            context.load_cert_chain(cert_path, key_path, password=password)

    def server_ssl_context(self) -> ssl.SSLContext:
        """A TLS server context presenting this identity's certificate (TLS >= 1.2)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._load_into(context)
        return context


class _PinnedSSLObject(ssl.SSLObject):
    def do_handshake(self) -> None:
        super().do_handshake()
        _check_pin(self.context, self.getpeercert(binary_form=True))


class _PinnedSSLSocket(ssl.SSLSocket):
    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        _check_pin(self.context, self.getpeercert(binary_form=True))


def _check_pin(context: ssl.SSLContext, der: Any) -> None:
    expected: bytes | None = getattr(context, "_teeshard_pin", None)
    got = cert_fingerprint(der) if isinstance(der, bytes) else b""
    if expected is None or not hmac.compare_digest(expected, got):
        raise ssl.SSLCertVerificationError(
            "peer certificate is not the attested one (fingerprint "
            f"{got.hex()[:16] or 'none'}..., pinned {(expected or b'').hex()[:16]}...)"
        )


def pinned_client_context(
    certificate_pem: bytes, client_identity: NodeIdentity | None = None
) -> ssl.SSLContext:
    """A client context that accepts exactly the certificate ``certificate_pem``.

    Two independent checks: OpenSSL verifies the chain with that certificate as
    the only trust anchor, and after the handshake the peer's DER must hash to the
    pinned SHA-256 fingerprint. Host names are not checked: the attested key is
    the identity. ``client_identity`` adds a client certificate (mutual TLS).
    """
    cert = load_certificate(certificate_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=cert.public_bytes(serialization.Encoding.PEM).decode())
    context.sslobject_class = _PinnedSSLObject
    context.sslsocket_class = _PinnedSSLSocket
    context._teeshard_pin = cert_fingerprint(cert)  # type: ignore[attr-defined]
    if client_identity is not None:
        client_identity._load_into(context)
    return context
