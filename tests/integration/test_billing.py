"""The entry node charges through a real SQLite ledger: reserve, settle, release, credit.

A customer with a balance pays for what it used; one without gets a 402 before
anything is generated; an operator of an admitted node uses the model free; an
abandoned stream pays for the tokens it produced; the admitted node is credited
with the request's tokens; the ledger's journal stays consistent throughout.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from teeshard.ledger.claims import AttestedNode, OperatorClaim
from teeshard.ledger.interface import NodeInfo
from teeshard.ledger.sql import SqlLedger
from tests.checkpoints import TinyModel
from tests.cluster import LocalCluster

PROMPT_PER_1K, COMPLETION_PER_1K = 1000, 2000


@dataclass
class Market:
    cluster: LocalCluster
    owner: SqlLedger
    downstream_id: str

    def chat(self, key: str | None, **extra: object) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}],
                "max_tokens": 8, "temperature": 0, **extra}  # fmt: skip
        return httpx.post(self.cluster.entry.http_url + "/v1/chat/completions", json=body,
                          headers=headers, timeout=60)  # fmt: skip


@pytest.fixture(scope="module")
def market(tiny_llama: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Market]:
    folder = tmp_path_factory.mktemp("market")
    url = f"sqlite:///{folder / 'ledger.db'}"
    pricing = folder / "pricing.toml"
    pricing.write_text(
        f"[models.tiny]\nprompt_per_1k = {PROMPT_PER_1K}\ncompletion_per_1k = {COMPLETION_PER_1K}\n"
    )
    owner = SqlLedger.open(url, "owner")
    owner.authorize_entry("entry-1")
    for name, funds in (("alice", 1000), ("bob", 0), ("carol", 0)):
        owner.open_account(name)
        if funds:
            owner.deposit(name, funds)
        owner.add_api_key(name, f"tsk_{name}")
    options = {
        "ledger_url": url, "pricing_path": pricing, "ledger_actor": "entry-1",
        "readmit_every_s": 0.5,  # the entry attests the pool's nodes again this often
    }  # fmt: skip
    carol = {1: {"operator": "carol"}}  # ``teeshard node --operator carol``
    with LocalCluster(tiny_llama.path, 2, entry_options=options, node_options=carol) as cluster:
        downstream = cluster.nodes[1]
        node_id = downstream.config.resolved_node_id
        manifest = downstream.get("/health").json()["attestation"]["manifest_hash"]
        # carol's node signs, with its attested key, a claim naming carol for our nonce
        nonce = os.urandom(32).hex()
        served = downstream.get(f"/v1/operator-claim?nonce={nonce}&ledger={owner.ledger_id()}")
        assert served.status_code == 200, served.text
        claim = OperatorClaim.from_json(served.json())
        owner.as_actor("carol").register_node(
            NodeInfo(node_id, downstream.http_url, manifest, "tiny", "2:4"), claim=claim
        )
        owner.admit_node(node_id, manifest, attested=AttestedNode(downstream.http_url, claim))
        yield Market(cluster, owner, node_id)
    owner.close()


def expected_cost(usage: dict[str, int]) -> int:
    return math.ceil(
        (usage["prompt_tokens"] * PROMPT_PER_1K + usage["completion_tokens"] * COMPLETION_PER_1K)
        / 1000
    )


def test_no_key_or_an_unknown_key_is_401(market: Market) -> None:
    assert market.chat(None).json()["error"]["code"] == "missing_api_key"
    unknown = market.chat("tsk_nobody")
    assert unknown.status_code == 401 and unknown.json()["error"]["code"] == "invalid_api_key"


def test_no_balance_is_402_before_anything_runs(market: Market) -> None:
    steps_before = market.cluster.nodes[1].get("/metrics").text
    response = market.chat("tsk_bob")
    assert response.status_code == 402
    error = response.json()["error"]
    assert error["code"] == "insufficient_balance" and "has 0 available" in error["message"]
    assert market.cluster.nodes[1].get("/metrics").text == steps_before  # no step ran
    assert market.owner.balance("bob").available == 0


def test_a_paid_request_is_charged_what_it_used_and_credits_the_chain(market: Market) -> None:
    before = market.owner.balance("alice").available
    served_before = {n.node_id: n.served_tokens for n in market.owner.nodes()}[market.downstream_id]
    earned_before = {n.node_id: n.earned for n in market.owner.nodes()}[market.downstream_id]
    response = market.chat("tsk_alice")
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert usage["cost"] == expected_cost(usage) > 0
    after = market.owner.balance("alice")
    assert after.available == before - usage["cost"] == usage["balance"]
    assert after.reserved == 0  # the rest of the reservation was released
    served = {n.node_id: n.served_tokens for n in market.owner.nodes()}[market.downstream_id]
    assert served - served_before == usage["total_tokens"]
    # its signed receipt earns it the share of the cost of its layers: 2:4 of 4
    earned = {n.node_id: n.earned for n in market.owner.nodes()}[market.downstream_id]
    assert earned - earned_before == usage["cost"] // 2
    assert market.owner.check().ok


def test_a_streamed_request_reports_its_cost(market: Market) -> None:
    before = market.owner.balance("alice").available
    events = []
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", market.cluster.entry.http_url + "/v1/chat/completions", json=body,
                      headers={"Authorization": "Bearer tsk_alice"}, timeout=60) as response:  # fmt: skip
        events = [
            json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")
        ]
    usage = events[-1]["usage"]
    assert usage["cost"] == expected_cost(usage)
    assert market.owner.balance("alice").available == before - usage["cost"]


def test_an_abandoned_stream_pays_for_what_it_produced(market: Market) -> None:
    """The attack: read nearly the whole stream, then hang up, and pay nothing. Now the
    prompt and every completion token produced are charged; only the rest is released."""
    before = market.owner.balance("alice")
    prompt = "Once upon a time"
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 200, "stream": True,
            "temperature": 0, "stop": []}  # fmt: skip
    read = 0
    with httpx.stream("POST", market.cluster.entry.http_url + "/v1/completions", json=body,
                      headers={"Authorization": "Bearer tsk_alice"}, timeout=60) as response:  # fmt: skip
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                read += 1
                if read == 12:
                    break  # the client walks away with twelve pieces of text
    deadline = time.monotonic() + 10
    while market.owner.balance("alice").reserved and time.monotonic() < deadline:
        time.sleep(0.05)
    after = market.owner.balance("alice")
    assert after.reserved == 0  # the unused rest went back
    entry = market.cluster.entry.node
    assert entry is not None
    prompt_tokens = len(entry.app.state.serving.codec.completion_prompt(prompt))
    charged = before.available - after.available
    at_least = expected_cost({"prompt_tokens": prompt_tokens, "completion_tokens": read})
    at_most = expected_cost({"prompt_tokens": prompt_tokens, "completion_tokens": 200})
    assert at_least <= charged < at_most
    assert market.owner.check().ok
    for node in market.cluster.nodes:  # and no node keeps the abandoned session's cache
        assert node.get("/health").json()["sessions"]["open"] == 0


def test_a_stream_whose_prompt_never_ran_is_released_in_full(market: Market) -> None:
    before = market.owner.balance("alice")
    too_long = market.chat("tsk_alice", max_tokens=10_000)  # refused before a session opens
    assert too_long.status_code == 400
    assert market.owner.balance("alice") == before


def test_operators_of_admitted_nodes_use_it_free(market: Market) -> None:
    response = market.chat("tsk_carol")  # carol has no balance but operates the admitted node
    assert response.status_code == 200
    assert response.json()["usage"]["cost"] == 0
    assert market.owner.balance("carol").available == 0


def test_per_character_pricing_charges_the_text_returned(
    tiny_llama: TinyModel, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    pricing = tmp_path / "pricing.toml"
    pricing.write_text('[models.tiny]\nscheme = "per_character"\nper_character = 3\n')
    owner = SqlLedger.open(url, "owner")
    owner.authorize_entry("entry-1")
    owner.open_account("dave")
    owner.deposit("dave", 100_000)
    owner.add_api_key("dave", "tsk_dave")
    options = {
        "ledger_url": url, "pricing_path": pricing, "ledger_actor": "entry-1",
        "readmit_every_s": 0.5,  # the entry attests the pool's nodes again this often
    }  # fmt: skip
    with LocalCluster(tiny_llama.path, 1, entry_options=options) as cluster:
        response = httpx.post(cluster.entry.http_url + "/v1/completions", timeout=60,
                              headers={"Authorization": "Bearer tsk_dave"},
                              json={"model": "tiny", "prompt": "Hello", "max_tokens": 10, "temperature": 0})  # fmt: skip
    body = response.json()
    text = body["choices"][0]["text"]
    assert body["usage"]["cost"] == 3 * len(text) > 0  # the original pricing: per character
    assert owner.balance("dave").available == 100_000 - 3 * len(text)
    owner.close()


def test_a_retry_with_the_same_idempotency_key_is_not_charged_twice(market: Market) -> None:
    before = market.owner.balance("alice").available
    key = {"Idempotency-Key": "order-7f3a"}
    headers = {"Authorization": "Bearer tsk_alice", **key}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "temperature": 0}  # fmt: skip
    first = httpx.post(market.cluster.entry.http_url + "/v1/chat/completions", json=body,
                       headers=headers, timeout=60)  # fmt: skip
    assert first.status_code == 200, first.text
    charged = before - market.owner.balance("alice").available
    assert charged == first.json()["usage"]["cost"] > 0
    retry = httpx.post(market.cluster.entry.http_url + "/v1/chat/completions", json=body,
                       headers=headers, timeout=60)  # fmt: skip
    assert retry.status_code == 409, retry.text
    assert market.owner.balance("alice").available == before - charged  # charged once
    bad = httpx.post(market.cluster.entry.http_url + "/v1/chat/completions", json=body,
                     headers={**headers, "Idempotency-Key": "x" * 300}, timeout=60)  # fmt: skip
    assert bad.status_code == 400


def test_a_node_without_an_operator_signs_no_claim(market: Market) -> None:
    entry = market.cluster.entry.get("/v1/operator-claim?nonce=" + "00" * 32 + "&ledger=x")
    assert entry.status_code == 404 and "--operator" in entry.json()["error"]["message"]
    garbled = market.cluster.nodes[1].get("/v1/operator-claim?nonce=zz&ledger=x")
    assert garbled.status_code == 400


def test_the_entry_node_renews_admissions_by_attesting_the_nodes_again(market: Market) -> None:
    """Admissions lapse unless re-attested: the entry node does it on a timer, fetching
    each node's bundle and claim afresh (the carol node's admission moves forward)."""

    def admitted_until() -> float:
        return {n.node_id: n for n in market.owner.nodes()}[market.downstream_id].admitted_until

    before = admitted_until()
    deadline = time.monotonic() + 20
    while admitted_until() <= before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert admitted_until() > before
