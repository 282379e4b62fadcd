"""Node identity and certificate pinning, over real TLS on loopback."""

from __future__ import annotations

import asyncio
import datetime
import socket
import ssl
import threading
from collections.abc import Iterator

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from teeshard.attest.identity import (
    NodeIdentity,
    cert_fingerprint,
    pinned_client_context,
    public_key_der,
)


class TlsServer:
    """A loopback TLS server answering each connection with a tiny HTTP response."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.handshakes = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            raw.settimeout(5)
            try:
                with self.context.wrap_socket(raw, server_side=True) as conn:
                    self.handshakes += 1
                    conn.recv(4096)
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                    )
            except (OSError, ssl.SSLError):
                continue

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def node() -> NodeIdentity:
    return NodeIdentity.generate()


@pytest.fixture
def server(node: NodeIdentity) -> Iterator[TlsServer]:
    running = TlsServer(node.server_ssl_context())
    yield running
    running.close()


def connect(port: int, context: ssl.SSLContext) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw) as conn,
    ):
        conn.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        return conn.recv(4096)


def test_identity_certificate(node: NodeIdentity) -> None:
    cert = node.certificate
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= datetime.timedelta(days=8)
    assert public_key_der(cert) == node.public_key_der
    assert (
        cert_fingerprint(cert)
        == node.fingerprint
        == cert_fingerprint(cert.public_bytes(serialization.Encoding.DER))
    )
    assert len(node.sealing_public_key) == 32
    assert "private_key" not in repr(node) and "sealing_key" not in repr(node)


def test_pinned_certificate_connects(node: NodeIdentity, server: TlsServer) -> None:
    assert connect(server.port, pinned_client_context(node.certificate_pem)).endswith(b"ok")


def test_another_certificate_is_refused(server: TlsServer) -> None:
    stranger = NodeIdentity.generate()
    with pytest.raises(ssl.SSLCertVerificationError):
        connect(server.port, pinned_client_context(stranger.certificate_pem))


def test_the_fingerprint_check_holds_even_if_openssl_would_accept(
    node: NodeIdentity, server: TlsServer
) -> None:
    """Two independent layers: with the server's cert added as a trust anchor, OpenSSL's
    chain check passes, and the post-handshake fingerprint pin still refuses it."""
    stranger = NodeIdentity.generate()
    context = pinned_client_context(stranger.certificate_pem)
    context.load_verify_locations(cadata=node.certificate_pem.decode())
    with pytest.raises(ssl.SSLCertVerificationError, match="not the attested one"):
        connect(server.port, context)


def test_a_twin_certificate_for_the_same_key_is_refused(node: NodeIdentity) -> None:
    cert = node.certificate
    twin = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(node.private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
        .sign(node.private_key, hashes.SHA256())
    )
    twin_identity = NodeIdentity(node.private_key, twin, node.sealing_key)
    running = TlsServer(twin_identity.server_ssl_context())
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            connect(running.port, pinned_client_context(node.certificate_pem))
        assert connect(running.port, pinned_client_context(twin_identity.certificate_pem))
    finally:
        running.close()


def test_pinning_works_for_asyncio_and_httpx(node: NodeIdentity, server: TlsServer) -> None:
    async def fetch(pem: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=pinned_client_context(pem)
        )
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        data = await reader.read(4096)
        writer.close()
        return data

    assert asyncio.run(fetch(node.certificate_pem)).endswith(b"ok")
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(fetch(NodeIdentity.generate().certificate_pem))
    with httpx.Client(verify=pinned_client_context(node.certificate_pem)) as client:
        assert client.get(f"https://127.0.0.1:{server.port}/").text == "ok"
    stranger = pinned_client_context(NodeIdentity.generate().certificate_pem)
    with httpx.Client(verify=stranger) as client, pytest.raises(httpx.ConnectError):
        client.get(f"https://127.0.0.1:{server.port}/")


def test_mutual_tls_with_a_client_identity(node: NodeIdentity) -> None:
    client_identity = NodeIdentity.generate()
    context = node.server_ssl_context()
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=client_identity.certificate_pem.decode())
    running = TlsServer(context)
    try:
        with_cert = pinned_client_context(node.certificate_pem, client_identity)
        assert connect(running.port, with_cert).endswith(b"ok")
        with pytest.raises((ssl.SSLError, OSError)):
            connect(running.port, pinned_client_context(node.certificate_pem))
    finally:
        running.close()
