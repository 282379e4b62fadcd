"""The console's network page: the stages of the entry node's chain and how each attests.

``stage_views`` re-verifies every bundle of ``/v1/attestation/chain`` against the
entry node's policy, the first (the entry node itself) against a fresh nonce,
the later ones as their upstream node last verified them (their own nonce, so
without freshness). Each stage says what it proves: provider and TEE type (an
INSECURE flag for simulated evidence), measurements, manifest, certificate
fingerprint, and the reason when verification fails. Blocking (collateral).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from teeshard.attest.errors import AttestationError
from teeshard.attest.evidence import Bundle
from teeshard.attest.identity import cert_fingerprint, load_certificate
from teeshard.attest.verify.bundle import verify_bundle
from teeshard.attest.verify.policy import Policy
from teeshard.attest.verify.quote import CollateralSource

ChainSource = Callable[[str], Mapping[str, Any]]  # nonce hex -> {"bundles": [...]}


@dataclass(frozen=True)
class StageView:
    stage: int
    layers: str
    model: str
    provider: str
    tee_type: str
    insecure: bool
    manifest_hash: str
    certificate_sha256: str
    signed_at: int
    verified: bool
    fresh: bool  # answered this request's nonce (only the entry node's bundle does)
    problem: str | None = None
    tcb_status: str | None = None
    measurements: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def stage_views(
    bundles: Sequence[Mapping[str, Any]],
    policy: Policy,
    nonce: bytes,
    collateral: CollateralSource | None = None,
) -> list[StageView]:
    views = []
    for index, raw in enumerate(bundles):
        try:
            bundle = Bundle.from_json(raw)
        except AttestationError as exc:
            views.append(_unreadable(index, f"malformed bundle: {exc}"))
            continue
        fresh = index == 0
        problem = None
        tcb = None
        measurements: Mapping[str, str] = {}
        try:
            node = verify_bundle(bundle, policy, nonce=nonce if fresh else bundle.nonce,
                                 collateral=collateral, check_freshness=fresh)  # fmt: skip
            tcb, measurements = node.tcb_status, node.measurements
        except AttestationError as exc:
            problem = str(exc)
        manifest, evidence = bundle.manifest, bundle.evidence
        view = StageView(
            index, str(manifest.layers), manifest.model, evidence.provider, evidence.tee_type,
            evidence.insecure, manifest.combined_hash.hex(),
            cert_fingerprint(load_certificate(bundle.certificate_pem)).hex(),
            bundle.signed_at, problem is None, fresh, problem, tcb, dict(measurements),
        )  # fmt: skip
        views.append(view)
    return views


def _unreadable(index: int, problem: str) -> StageView:
    return StageView(index, "", "", "", "", True, "", "", 0, False, False, problem)


def network_view(
    chain: ChainSource,
    policy: Policy,
    health: Mapping[str, Any],
    collateral: CollateralSource | None = None,
) -> dict[str, Any]:
    """Every attested stage, and the entry node's health as this caller may see it.

    ``health`` is the node's ``/health`` for this caller: load and the next hop's
    address only for the admin token or on a loopback node, else just its status.
    """
    nonce = secrets.token_bytes(32)
    bundles = list(chain(nonce.hex()).get("bundles", []))
    stages = stage_views(bundles, policy, nonce, collateral)
    num_layers = health.get("num_layers", _num_layers(bundles))
    return {
        "model": stages[0].model if stages else None,
        "num_layers": num_layers,
        "detail": "sessions" in health,
        "entry": {
            "status": health.get("status"),
            "layers": health.get("layers"),
            "sessions": health.get("sessions"),
            "memory": health.get("memory"),
        },
        "next": _next_hop(health.get("next")),
        "stages": [s.to_json() for s in stages],
        "covers_all_layers": _covers(stages, num_layers),
    }


def _next_hop(stats: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The entry's default next hop, as the page shows it (url, connected, in flight),
    from the hop pool's stats (its default URL and every peer it holds)."""
    if not stats:
        return None
    peers = {p.get("url"): p for p in stats.get("peers", [])}
    url = stats.get("default") or next(iter(peers), None)
    if url is None:
        return None
    peer = peers.get(url, {})
    return {
        "url": url,
        "connected": bool(peer.get("connected", False)),
        "in_flight": int(peer.get("in_flight", 0)),
        "peers": len(peers),
    }


def _num_layers(bundles: Sequence[Mapping[str, Any]]) -> int | None:
    """The model's layer count, as the last stage's attested manifest states it."""
    try:
        return Bundle.from_json(bundles[-1]).manifest.num_layers if bundles else None
    except AttestationError:
        return None


def _covers(stages: Sequence[StageView], num_layers: object) -> bool:
    position = 0
    for stage in stages:
        start, _, end = stage.layers.partition(":")
        if not stage.verified or not start.isdigit() or int(start) != position:
            return False
        position = int(end)
    return isinstance(num_layers, int) and position == num_layers
