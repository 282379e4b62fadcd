"""Item 16: a node re-keys and re-quotes before its 7-day certificate expires.

Real TLS on loopback: the server context the node made at start presents the new
certificate after the refresh, the new bundle verifies (its quote binds the new
key), and a peer still pinned to the old certificate is refused, so it must
re-attest, which is what a reconnecting upstream does.
"""

from __future__ import annotations

import asyncio
import datetime
import secrets
import ssl

import pytest

from teeshard.attest.attester import NodeAttestation
from teeshard.attest.errors import ProviderError
from teeshard.attest.evidence import Evidence
from teeshard.attest.identity import NodeIdentity, pinned_client_context
from teeshard.attest.manifest import ShardManifest
from teeshard.attest.providers.simulated import SimulatedProvider
from teeshard.attest.verify.bundle import verify_bundle
from teeshard.attest.verify.policy import Policy
from tests.attest.test_identity import TlsServer, connect

HOSTS = ("localhost", "127.0.0.1", "node-b.example")


def short_lived(minutes: int = 6) -> NodeIdentity:
    """Valid from 5 minutes ago: most of its life is already spent, so renewal is due."""
    return NodeIdentity.generate(HOSTS, validity=datetime.timedelta(minutes=minutes))


@pytest.fixture
def provider() -> SimulatedProvider:
    return SimulatedProvider()


def verified(node: NodeAttestation, provider: SimulatedProvider) -> bytes:
    nonce = secrets.token_bytes(32)
    policy = Policy().pinning_simulated(provider.public_key)
    result = verify_bundle(
        node.bundle(nonce), policy, nonce=nonce, expected_manifest_hash=node.manifest.combined_hash
    )
    return result.fingerprint


def test_refresh_rekeys_requotes_and_the_server_presents_the_new_certificate(
    provider: SimulatedProvider, manifests: dict[str, ShardManifest]
) -> None:
    node = NodeAttestation.create(provider, manifests["2:3"], short_lived())
    old = node.identity
    server = TlsServer(node.server_ssl_context())
    try:
        assert connect(server.port, pinned_client_context(old.certificate_pem)).endswith(b"ok")
        assert verified(node, provider) == old.fingerprint
        assert node.refresh_if_due() is True
        new = node.identity
        assert new.fingerprint != old.fingerprint
        assert new.sealing_public_key != old.sealing_public_key
        assert new.hosts == old.hosts and new.validity == old.validity
        # the bundle now carries the new certificate and a quote over the new keys
        assert verified(node, provider) == new.fingerprint
        # the same server context, the next handshake: the new certificate
        assert connect(server.port, pinned_client_context(new.certificate_pem)).endswith(b"ok")
        with pytest.raises(ssl.SSLCertVerificationError):
            connect(server.port, pinned_client_context(old.certificate_pem))
        assert node.identities() == (new, old)  # sealed requests made just before still open
    finally:
        server.close()


def test_refresh_only_when_due(
    provider: SimulatedProvider, manifests: dict[str, ShardManifest]
) -> None:
    node = NodeAttestation.create(provider, manifests["2:3"])  # 7 days, just made
    before = node.identity.fingerprint
    assert node.refresh_if_due() is False and node.identity.fingerprint == before
    now = datetime.datetime.now(datetime.UTC)
    assert not node.identity.renewal_due(now + datetime.timedelta(days=5))
    assert node.identity.renewal_due(now + datetime.timedelta(days=6))


def test_no_provider_no_refresh(manifests: dict[str, ShardManifest]) -> None:
    identity = short_lived()
    node = NodeAttestation(identity, manifests["2:3"], SimulatedProvider().quote(bytes(64)))
    with pytest.raises(ProviderError, match="without a provider"):
        node.refresh()
    assert node.identity is identity


class FailingProvider:
    name = "flaky"

    def __init__(self, inner: SimulatedProvider) -> None:
        self.inner, self.fail = inner, False

    def quote(self, report_data: bytes) -> Evidence:
        if self.fail:
            raise ProviderError("flaky: the guest agent is restarting")
        return self.inner.quote(report_data)


def test_keep_fresh_renews_on_its_timer_and_survives_a_failed_quote(
    provider: SimulatedProvider, manifests: dict[str, ShardManifest]
) -> None:
    flaky = FailingProvider(provider)
    node = NodeAttestation.create(flaky, manifests["2:3"], short_lived())
    first = node.identity.fingerprint

    async def run() -> None:
        flaky.fail = True
        timer = asyncio.create_task(node.keep_fresh(check_every_s=0.01))
        await asyncio.sleep(0.2)
        assert node.identity.fingerprint == first  # failed quotes leave the old identity
        assert not timer.done()  # ... and the timer keeps going
        flaky.fail = False
        for _ in range(200):
            if node.identity.fingerprint != first:
                break
            await asyncio.sleep(0.01)
        timer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await timer

    asyncio.run(run())
    assert node.identity.fingerprint != first
    assert verified(node, provider) == node.identity.fingerprint
