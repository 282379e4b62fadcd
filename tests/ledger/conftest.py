"""Fixtures: ``world`` runs a test once per ledger backend (SQLite, PostgreSQL, EVM, anvil).

PostgreSQL needs ``TEESHARD_TEST_POSTGRES_URL`` and anvil needs the binary
(``scripts/services.sh`` provides both); without them those runs skip and
say why. CI runs that script, so there they never skip.

``real_node`` is a real teeshard node (layers 2:4 of the tiny llama, HTTPS with
its attested self-signed certificate, simulated attestation), once per module.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.responses import JSONResponse
from ledger_harness import (
    ClaimRoute,
    ServiceWorld,
    World,
    anvil_path,
    evm_world,
    postgres_url,
    reset_postgres,
    sql_world,
)
from tests.checkpoints import TinyModel
from tests.cluster import LocalCluster, RunningNode

from teeshard.attest import compute_manifest
from teeshard.ledger.claims import CLAIM_PATH, claim_response
from teeshard.ledger.interface import ClaimRefused
from teeshard.model.checkpoint import Checkpoint
from teeshard.model.layer_range import LayerRange

BACKENDS = ("sqlite", "postgres", "service", "evm", "anvil")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def anvil_rpc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = anvil_path()
    if binary is None:
        pytest.skip("anvil is not installed (run scripts/services.sh or set TEESHARD_ANVIL)")
    from teeshard.ledger import anvil

    state = tmp_path_factory.mktemp("anvil") / "state.json"
    chain = anvil.start(state, port=_free_port(), anvil=binary)
    try:
        yield chain.rpc_url
    finally:
        anvil.stop(state)


@pytest.fixture(scope="session")
def anvil_chain(anvil_rpc: str) -> object:
    from teeshard.ledger.evm import Chain

    return Chain.connect(anvil_rpc)


def make_world(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> World:
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.db'}"
        return sql_world(backend, url)
    if backend == "postgres":
        url = postgres_url()
        if url is None:
            pytest.skip("no PostgreSQL: set TEESHARD_TEST_POSTGRES_URL (scripts/services.sh)")
        try:
            reset_postgres(url)
        except Exception as exc:  # the server is named but does not answer
            pytest.skip(f"PostgreSQL at TEESHARD_TEST_POSTGRES_URL does not answer: {exc}")
        return sql_world(backend, url)
    if backend == "evm":
        from teeshard.ledger.evm import Chain

        return evm_world(backend, Chain.tester())
    if backend == "anvil":
        chain = request.getfixturevalue("anvil_chain")
        return evm_world(backend, chain, request.getfixturevalue("anvil_rpc"))
    raise ValueError(backend)


def service_world(tmp_path: Path) -> Iterator[World]:
    """The SQLite ledger behind a real ledger service: owner and entry hold actor keys."""
    from service_server import serving

    from teeshard.ledger.remote import RemoteLedger
    from teeshard.ledger.sql import SqlLedger

    direct = SqlLedger.open(f"sqlite:///{tmp_path / 'ledger.db'}", "owner")
    direct.authorize_entry("entry-1")
    with serving(direct.engines) as base_url:
        owner = RemoteLedger(base_url, direct.add_actor_key("owner"))
        entry_key = direct.add_actor_key("entry-1")
        entry = RemoteLedger(base_url, entry_key)
        world = ServiceWorld(
            "service", f"ledger+{base_url}", owner, entry, direct=direct, base_url=base_url
        )
        world._env = {"TEESHARD_LEDGER_KEY": entry_key}
        try:
            yield world
        finally:
            entry.close()
            owner.close()
    direct.close()


@pytest.fixture(params=BACKENDS)
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    if request.param == "service":
        yield from service_world(tmp_path)
        return
    w = make_world(request.param, request, tmp_path)
    try:
        yield w
    finally:
        w.owner.close()


@pytest.fixture(params=("sqlite", "postgres"))
def sql(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    w = make_world(request.param, request, tmp_path)
    try:
        yield w
    finally:
        w.owner.close()


@pytest.fixture(params=("sqlite", "evm"))
def one_sql_one_evm(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    """For tests whose backend-specific part the full suite already covers."""
    w = make_world(request.param, request, tmp_path)
    try:
        yield w
    finally:
        w.owner.close()


NODE_LAYERS = LayerRange(2, 4)


@pytest.fixture(scope="session")
def node_manifest(tiny_llama: TinyModel) -> str:
    """The manifest hash ``real_node`` attests, computed from the checkpoint (hex)."""
    manifest = compute_manifest(
        Checkpoint(tiny_llama.path), NODE_LAYERS, "float32", model_name="tiny"
    )
    return manifest.combined_hash.hex()


@pytest.fixture(scope="module")
def claims() -> ClaimRoute:
    return ClaimRoute()


@pytest.fixture(scope="module")
def real_node(tiny_llama: TinyModel, claims: ClaimRoute) -> Iterator[RunningNode]:
    """``.http_url`` (https), ``.config.policy_path`` (allows simulated, names its manifest).

    It serves ``GET /v1/operator-claim`` (``teeshard.ledger.claims.claim_response``,
    mounted here as the node assembly mounts it) for ``claims.operator``.
    """
    with LocalCluster(tiny_llama.path, 1, ranges=[NODE_LAYERS]) as cluster:
        running = cluster.entry  # not an entry node: the cluster's first (and only) node
        assert running.node is not None
        identity = running.node.trust.attestation.identity
        node_id = running.config.resolved_node_id

        def operator_claim(nonce: str, ledger: str) -> JSONResponse:
            try:
                body = claim_response(identity, claims.operator, node_id, nonce, ledger)
            except ClaimRefused as exc:
                return JSONResponse({"error": {"message": exc.message}}, status_code=400)
            return JSONResponse(body)

        running.node.app.add_api_route(CLAIM_PATH, operator_claim, methods=["GET"])
        yield running
