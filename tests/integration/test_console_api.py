"""The console's JSON endpoints on a live two-node cluster billing through SQLite.

Accounts are read by API key only (no account parameter to forge); a node is
admitted only after the entry node verified it, and only for its own operator;
bad input gets a clear error with a fitting status, and the server keeps serving.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from teeshard.attest import Policy
from teeshard.entry.console_static import CONTENT_SECURITY_POLICY
from teeshard.ledger.billing import UNKNOWN_NODE_REFRESH_S
from teeshard.ledger.registration import ExpectedShards, default_verifier, register_from_url
from teeshard.ledger.sql import SqlLedger
from tests.checkpoints import TinyModel
from tests.cluster import LocalCluster


@dataclass
class Console:
    cluster: LocalCluster
    owner: SqlLedger

    @property
    def url(self) -> str:
        return self.cluster.entry.http_url

    @property
    def downstream(self) -> str:
        return self.cluster.nodes[1].http_url

    def get(self, path: str, key: str | None = None) -> httpx.Response:
        return httpx.get(self.url + path, headers=_auth(key), timeout=60)

    def post(self, path: str, body: Any, key: str | None = None) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=_auth(key), timeout=60)


def _auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


@pytest.fixture(scope="module")
def console(tiny_llama: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    folder = tmp_path_factory.mktemp("console-api")
    url = f"sqlite:///{folder / 'ledger.db'}"
    pricing = folder / "pricing.toml"
    pricing.write_text("[models.tiny]\nprompt_per_1k = 1000\ncompletion_per_1k = 2000\n")
    owner = SqlLedger.open(url, "owner")
    owner.authorize_entry("entry-1")
    for name, funds in (("alice", 1000), ("bob", 0), ("carol", 0), ("dave", 0)):
        owner.open_account(name)
        if funds:
            owner.deposit(name, funds)
        owner.add_api_key(name, f"tsk_{name}")
    options = {"ledger_url": url, "pricing_path": pricing, "ledger_actor": "entry-1"}
    operator = {1: {"operator": "carol"}}  # the node's claim names carol
    with LocalCluster(tiny_llama.path, 2, entry_options=options, node_options=operator) as cluster:
        yield Console(cluster, owner)
    owner.close()


def test_info_names_the_model_and_the_ledger(console: Console) -> None:
    info = console.get("/v1/console/info").json()
    assert info == {"model": "tiny", "ledger": "sql", "free_for_operators": True, "evm": None}


def test_account_needs_a_valid_key(console: Console) -> None:
    missing = console.get("/v1/console/account")
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    wrong = console.get("/v1/console/account", "tsk_nobody")
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "unknown_account"
    malformed = httpx.get(console.url + "/v1/console/account", headers={"Authorization": "tsk"})
    assert malformed.status_code == 401


def test_account_and_usage_match_the_ledger_exactly(console: Console) -> None:
    before = console.get("/v1/console/account", "tsk_alice").json()
    assert before["account"] == "alice" and before["free_use"] is False
    chat = httpx.post(
        console.url + "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
              "temperature": 0},
        headers=_auth("tsk_alice"),
        timeout=60,
    )  # fmt: skip
    assert chat.status_code == 200
    cost = chat.json()["usage"]["cost"]
    assert chat.json()["served_by"][0] == console.cluster.entry.config.resolved_node_id
    after = console.get("/v1/console/account", "tsk_alice").json()
    assert before["available"] - after["available"] == cost
    assert after["available"] == console.owner.balance("alice").available
    assert after["reserved"] == 0
    rows = console.get("/v1/console/usage?limit=5", "tsk_alice").json()["data"]
    assert rows[0]["state"] == "settled" and rows[0]["cost"] == cost
    assert rows[0]["reserved"] >= cost
    # bob sees his own (empty) history, never alice's
    assert console.get("/v1/console/usage", "tsk_bob").json()["data"] == []
    assert console.get("/v1/console/usage?limit=0", "tsk_bob").status_code == 400


def test_network_reverifies_every_stage(console: Console) -> None:
    network = console.get("/v1/console/network").json()
    stages = network["stages"]
    assert [s["layers"] for s in stages] == ["0:2", "2:4"]
    assert all(s["verified"] and s["insecure"] and s["provider"] == "simulated" for s in stages)
    assert [s["fresh"] for s in stages] == [True, False]
    assert network["covers_all_layers"] is True
    assert network["next"]["connected"] is True
    entry_hash = console.cluster.entry.get("/health").json()["attestation"]["manifest_hash"]
    assert stages[0]["manifest_hash"] == entry_hash


def test_inspect_verifies_a_node_and_names_its_slot(console: Console) -> None:
    anonymous = console.post("/v1/console/pool/inspect", {"url": console.downstream})
    assert anonymous.status_code == 401  # the entry node fetches URLs only for its users
    found = console.post("/v1/console/pool/inspect", {"url": console.downstream}, "tsk_bob")
    assert found.status_code == 200, found.text
    body = found.json()
    assert body["layers"] == "2:4" and body["insecure"] is True and body["provider"] == "simulated"
    assert any("INSECURE" in note for note in body["notes"])


def test_inspect_refuses_what_it_cannot_verify(console: Console) -> None:
    def inspect(body: object) -> httpx.Response:
        return console.post("/v1/console/pool/inspect", body, "tsk_bob")

    nothing = inspect({"url": "https://127.0.0.1:9"})
    assert nothing.status_code == 422
    assert nothing.json()["error"]["code"] == "registration_refused"
    assert inspect({"url": console.downstream, "admin": True}).status_code == 400
    assert inspect({"url": 42}).status_code == 400
    assert inspect({"url": "file:///etc/passwd"}).status_code == 422


def test_only_its_operator_can_have_a_node_admitted(console: Console) -> None:
    """Attack: bob asks the entry node to admit a node carol registered (not admitted yet)."""
    node = console.cluster.nodes[1]
    node_id = node.config.resolved_node_id
    manifest = node.get("/health").json()["attestation"]["manifest_hash"]
    policy = Policy.load(node.config.policy_path, allow_simulated=True)
    registered = register_from_url(
        console.owner.as_actor("carol"), console.downstream,
        ExpectedShards.from_policy(policy), default_verifier(policy),
    )  # fmt: skip
    assert not registered.admitted and registered.node.manifest_hash == manifest
    attack = console.post("/v1/console/pool/admit", {"url": console.downstream}, "tsk_bob")
    assert attack.status_code == 403, attack.text
    assert not next(n for n in console.owner.nodes() if n.node_id == node_id).admitted
    own = console.post("/v1/console/pool/admit", {"url": console.downstream}, "tsk_carol")
    assert own.status_code == 200 and own.json()["admitted"] is True
    again = console.post("/v1/console/pool/register", {"url": console.downstream}, "tsk_dave")
    assert again.status_code == 422  # carol's node, claimed for carol: not dave's to register
    assert "claim names operator 'carol', not 'dave'" in again.json()["error"]["message"]
    pool = console.get("/v1/console/pool").json()
    (listed,) = [n for n in pool["nodes"] if n["node_id"] == node_id]
    assert listed["admitted"] and listed["operator"] == "carol"
    carol = console.get("/v1/console/account", "tsk_carol").json()
    assert carol["operator"] is True and carol["free_use"] is True


def test_an_operator_withdraws_exactly_its_share(console: Console) -> None:
    # billing looks again for a node admitted since its last look after this long
    time.sleep(UNKNOWN_NODE_REFRESH_S + 0.5)
    chat = httpx.post(
        console.url + "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "Pay the pool"}],
              "max_tokens": 4, "temperature": 0},
        headers=_auth("tsk_alice"),
        timeout=60,
    )  # fmt: skip
    assert chat.status_code == 200
    pool = console.get("/v1/console/pool").json()
    (node,) = [n for n in pool["nodes"] if n["operator"] == "carol"]
    assert node["served_tokens"] > 0 and 0 < node["pending_payout"] <= pool["pool"]
    shares = console.owner.distribute().shares
    assert shares["carol"] == node["pending_payout"]
    earned = console.get("/v1/console/account", "tsk_carol").json()["earnings"]
    assert earned == shares["carol"] > 0
    done = console.post("/v1/console/pool/withdraw", {}, "tsk_carol")
    assert done.status_code == 200 and done.json()["withdrawn"] == earned
    assert console.get("/v1/console/account", "tsk_carol").json()["earnings"] == 0
    assert console.post("/v1/console/pool/withdraw", {}, "tsk_carol").status_code == 400
    assert console.owner.check().ok


def test_withdraw_without_earnings_is_refused_and_nothing_moves(console: Console) -> None:
    before = console.owner.balance("dave")
    refused = console.post("/v1/console/pool/withdraw", {}, "tsk_dave")
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_amount"
    assert console.owner.balance("dave") == before
    assert console.post("/v1/console/pool/withdraw", {"amount": -5}, "tsk_dave").status_code == 400
    assert console.owner.check().ok


def test_wallet_transactions_need_an_evm_ledger(console: Console) -> None:
    refused = console.post("/v1/console/wallet/tx", {"action": "deposit", "amount": 1})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "not_evm"
    assert console.post("/v1/console/wallet/tx", {"action": "mint"}).status_code == 400


def test_the_page_and_its_assets_carry_a_strict_policy(console: Console) -> None:
    for path in ("/", "/console/console.js", "/console/console.css"):
        response = console.get(path)
        assert response.status_code == 200
        assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert response.headers["x-content-type-options"] == "nosniff"
    assert console.get("/console/..%2Fconsole_api.py").status_code == 404
    assert console.get("/console/index.html.bak").status_code == 404
    assert console.get("/health").status_code == 200  # still serving
