"""Replicas and failover through real servers: nodes killed with SIGKILL mid-stream.

A network of three ranges, two replicas for each range after the entry's, every
node a subprocess. A streamed completion whose route loses a node (the last
one, so the middle hop names it; then a middle one, lost by the entry itself)
completes, token for token equal to a run without failure, greedy and seeded
sampled alike; its receipts verify segment by segment; billing settles once, and
every node admitted in the ledger is credited for the token positions its segment
of the answer added (the lost node, which could not sign, for nothing).
When no route is left, the stream ends with a clear OpenAI error.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from teeshard.attest import (
    Bundle,
    ReceiptError,
    cert_fingerprint,
    fetch_chain,
    parse_response,
    verify_response,
)
from teeshard.attest.identity import load_certificate
from teeshard.ledger.claims import AttestedNode, OperatorClaim
from teeshard.ledger.interface import NodeInfo
from teeshard.ledger.sql import SqlLedger
from tests.checkpoints import TinyModel
from tests.cluster import LocalCluster, RunningNode


@dataclass
class Streamed:
    events: list[dict[str, Any]]
    transcript: str

    @property
    def text(self) -> str:
        return "".join(
            e["choices"][0]["text"] for e in self.events if e.get("choices") and "error" not in e
        )

    @property
    def last(self) -> dict[str, Any]:
        return self.events[-1]

    @property
    def token_ids(self) -> list[int]:
        return list(self.last["teeshard"]["completion_token_ids"])

    @property
    def error(self) -> dict[str, Any] | None:
        errors = [e["error"] for e in self.events if "error" in e]
        return errors[0] if errors else None


def stream(
    cluster: LocalCluster, body: dict[str, Any], after: int = 0, then: Callable[[], None] = print
) -> Streamed:
    """Stream a completion; after ``after`` events run ``then``."""
    events: list[dict[str, Any]] = []
    lines: list[str] = []
    headers = {"Authorization": "Bearer tsk_alice", "Content-Type": "application/json"}
    url = cluster.entry.http_url + "/v1/completions"
    content = json.dumps(body).encode()  # the exact bytes stage 0's receipt hashes
    with httpx.stream("POST", url, content=content, headers=headers, timeout=60) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            lines.append(line)
            if not line.startswith("data: {"):
                continue
            events.append(json.loads(line[6:]))
            if after and len(events) == after:
                then()  # inline: the entry generates on meanwhile, the kill lands mid-stream
    return Streamed(events, "\n".join(lines))


def route_in_use(cluster: LocalCluster) -> list[str]:
    routes = cluster.network_state()["routes"]
    assert len(routes) == 1, routes
    return list(routes[0])


def signers(cluster: LocalCluster) -> list[Bundle]:
    """Every live node's attested bundle: whoever signed a segment is among them."""
    out = []
    for node in cluster.nodes:
        if node.process is not None and node.process.poll() is None:
            out.append(Bundle.from_json(fetch_chain(node.http_url, secrets.token_bytes(32))[0]))
    return out


@dataclass
class Network:
    cluster: LocalCluster
    ledger: SqlLedger
    bundles: list[Bundle]
    node_ids: dict[bytes, str] | None = None  # certificate SHA-256 -> admitted node id


def admit_all(cluster: LocalCluster, owner: SqlLedger) -> dict[bytes, str]:
    """Register every node after the entry for its operator (``op<index>``) with the
    node's own signed claim, and admit it; the node id of each attested certificate."""
    node_ids = {}
    for index, node in enumerate(cluster.nodes[1:], 1):
        node_id = node.config.resolved_node_id
        manifest = node.get("/health").json()["attestation"]["manifest_hash"]
        nonce = os.urandom(32).hex()
        served = node.get(f"/v1/operator-claim?nonce={nonce}&ledger={owner.ledger_id()}")
        assert served.status_code == 200, served.text
        claim = OperatorClaim.from_json(served.json())
        info = NodeInfo(node_id, node.http_url, manifest, "tiny", str(node.config.layers))
        owner.as_actor(f"op{index}").register_node(info, claim=claim)
        owner.admit_node(node_id, manifest, attested=AttestedNode(node.http_url, claim))
        bundle = Bundle.from_json(fetch_chain(node.http_url, secrets.token_bytes(32))[0])
        node_ids[cert_fingerprint(load_certificate(bundle.certificate_pem))] = node_id
    return node_ids


def earned(net: Network) -> dict[str, int]:
    return {n.node_id: n.earned for n in net.ledger.nodes()}


def check_credits(net: Network, result: Streamed, before: dict[str, int]) -> dict[str, int]:
    """The credits of one answer, from the ledger, against what its segments signed:
    each admitted node earns cost x its layers x the positions its segment added
    beyond the earlier segments', over 4 layers x the positions of the whole answer."""
    assert net.node_ids is not None
    usage = result.last["usage"]
    got = {k: v - before.get(k, 0) for k, v in earned(net).items() if v != before.get(k, 0)}
    whole = usage["prompt_tokens"] + len(result.token_ids) - 1  # the last token never ran
    want: dict[str, int] = {}
    reached = 0
    for segment in result.last.get("receipt_segments") or [{"receipts": result.last["receipts"]}]:
        sent = segment["receipts"][0]["positions"]  # no stage is credited past its upstream
        for receipt in segment["receipts"]:
            sent = min(sent, receipt["positions"])
            node_id = net.node_ids.get(bytes.fromhex(receipt["signer"]))
            if node_id is not None:
                start, end = map(int, receipt["layers"].split(":"))
                units = (end - start) * max(0, sent - reached)
                want[node_id] = want.get(node_id, 0) + units
        reached = max(reached, segment["receipts"][0]["positions"])
    assert reached == whole
    want = {k: usage["cost"] * u // (4 * whole) for k, u in want.items() if u}
    assert got == {k: v for k, v in want.items() if v}
    assert sum(got.values()) <= usage["cost"]
    return got


@pytest.fixture(scope="module")
def network(tiny_llama: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    folder: Path = tmp_path_factory.mktemp("failover")
    url = f"sqlite:///{folder / 'ledger.db'}"
    owner = SqlLedger.open(url, "owner")
    owner.authorize_entry("entry-1")
    owner.open_account("alice")
    owner.deposit("alice", 10_000_000)
    owner.add_api_key("alice", "tsk_alice")
    operators = {i: {"operator": f"op{i}"} for i in range(1, 5)}
    for name in (f"op{i}" for i in operators):
        owner.open_account(name)
    # a stream with no route left waits this long for a node to come back
    options = {"ledger_url": url, "ledger_actor": "entry-1", "failover_deadline_s": 3.0}
    with LocalCluster(
        tiny_llama.path, 3, subprocesses=True, replicas=2, entry_options=options, ban_s=300,
        node_options=operators,
    ) as cluster:  # fmt: skip
        node_ids = admit_all(cluster, owner)
        # every node's bundle, taken while all live (killed ones signed earlier segments)
        yield Network(cluster, owner, signers(cluster), node_ids)
    owner.close()


GREEDY = {"model": "tiny", "prompt": "Hello", "max_tokens": 240, "temperature": 0,
          "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
# sampled, with every control that depends on the token history too: the rebuilt
# session gets the prompt's ids and the output so far in ``open``
SAMPLED = {**GREEDY, "temperature": 0.9, "top_p": 0.95, "seed": 1234, "presence_penalty": 0.5,
           "frequency_penalty": 0.3, "repetition_penalty": 1.3, "logit_bias": {"7": 2.0},
           "min_tokens": 20}  # fmt: skip


def check_receipts(net: Network, result: Streamed, body: dict[str, Any]) -> int:
    claims = parse_response(result.transcript)
    report = verify_response(
        claims, net.bundles, request_body=json.dumps(body).encode(), num_layers=4
    )
    return report.segments


def last_signer(net: Network, result: Streamed) -> str:
    """The node that signed the last stage of the answer's final route."""
    assert net.node_ids is not None
    return net.node_ids[bytes.fromhex(result.last["receipts"][-1]["signer"])]


def layers_of(net: Network, node_id: str) -> str:
    return {n.node_id: n.layers for n in net.ledger.nodes()}[node_id]


def test_failover_keeps_greedy_and_sampled_output_identical(network: Network) -> None:
    cluster = network.cluster
    before = earned(network)
    reference = stream(cluster, GREEDY)
    whole = check_credits(network, reference, before)  # one route: each node its layers' share
    assert len(whole) == 2  # the two nodes after the entry (which is not admitted)
    # the registry reads the step load of every node at its probes (from /metrics: the
    # nodes are on loopback); the two that served have a measured step time by now
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        loads = [n["load"] for n in cluster.network_state()["nodes"]]
        if sum(1 for load in loads if load and load["step_ms"]) >= 2:
            break
        time.sleep(0.2)
    assert all(load is not None for load in loads), loads
    assert sum(1 for load in loads if load["step_ms"]) >= 2, loads
    sampled_reference = stream(cluster, SAMPLED)
    assert reference.error is None and len(reference.token_ids) == 240
    assert sampled_reference.token_ids != reference.token_ids  # sampling really samples
    balance = network.ledger.balance("alice").available

    # 1. the last node of the route dies: the middle hop loses it and names it
    victims: list[RunningNode] = []

    def kill_last() -> None:
        victims.append(cluster.by_url(route_in_use(cluster)[-1]))
        victims[-1].kill()

    before = earned(network)
    greedy = stream(cluster, GREEDY, 5, kill_last)
    assert greedy.error is None, greedy.error
    # credit split by segment: the lost last node signed nothing and earns nothing; its
    # replacement earns for the positions it added, less than a whole answer's share
    credits = check_credits(network, greedy, before)
    lost = victims[0].config.resolved_node_id
    assert lost not in credits
    replacement = last_signer(network, greedy)
    start, end = map(int, layers_of(network, replacement).split(":"))
    share = greedy.last["usage"]["cost"] * (end - start) // 4  # its layers, every position
    assert 0 < credits[replacement] < share
    assert greedy.token_ids == reference.token_ids and greedy.text == reference.text
    same = ("prompt_tokens", "completion_tokens", "total_tokens", "cost")
    assert [greedy.last["usage"][k] for k in same] == [reference.last["usage"][k] for k in same]
    assert check_receipts(network, greedy, GREEDY) == 2
    state = cluster.network_state()
    assert state["counters"]["failovers"] == 1
    banned = {n["url"]: n for n in state["nodes"]}[f"wss://127.0.0.1:{victims[0].config.port}"]
    assert banned["banned_for_s"] > 0 and banned["ban_reason"]

    # 2. the middle node of a seeded sampled stream dies: the entry loses it itself
    def kill_first() -> None:
        victims.append(cluster.by_url(route_in_use(cluster)[0]))
        victims[-1].kill()

    before = earned(network)
    sampled = stream(cluster, SAMPLED, 7, kill_first)
    assert sampled.error is None, sampled.error
    credits = check_credits(network, sampled, before)
    assert victims[1].config.resolved_node_id not in credits and len(credits) == 2
    assert sampled.token_ids == sampled_reference.token_ids
    assert sampled.text == sampled_reference.text
    assert check_receipts(network, sampled, SAMPLED) == 2
    assert cluster.network_state()["counters"]["failovers"] == 2

    # billing: each answer settled once, at the price of one without failover
    costs = [r.last["usage"]["cost"] for r in (reference, sampled_reference, greedy, sampled)]
    assert costs[2] == costs[0] and costs[3] == costs[1]
    assert network.ledger.balance("alice").available == balance - costs[2] - costs[3]
    assert network.ledger.balance("alice").reserved == 0
    assert network.ledger.check().ok

    # a tampered segment boundary does not verify
    lines = sampled.transcript.splitlines()
    at = max(i for i, line in enumerate(lines) if line.startswith("data: {"))
    moved = json.loads(lines[at][6:])
    moved["receipt_segments"][0]["tokens"][1] -= 1
    moved["receipt_segments"][1]["tokens"][0] -= 1
    lines[at] = "data: " + json.dumps(moved)
    tampered = parse_response("\n".join(lines))
    assert tampered.segments != parse_response(sampled.transcript).segments
    with pytest.raises(ReceiptError, match="not the tokens the last stage sent"):
        verify_response(tampered, network.bundles, num_layers=4)


def test_with_no_route_left_the_stream_ends_with_a_clear_error(network: Network) -> None:
    """Runs after the kills above: one node per range is left; kill it mid-stream."""
    cluster = network.cluster
    balance = network.ledger.balance("alice").available

    def kill_route() -> None:
        cluster.by_url(route_in_use(cluster)[-1]).kill()

    result = stream(cluster, GREEDY, 5, kill_route)
    error = result.error
    assert error is not None, result.events[-2:]
    assert error["code"] == "no_route" and "before the failover deadline" in error["message"]
    assert "no usable node serves layers from 3" in error["message"]
    assert cluster.network_state()["detail"] is True
    # the entry keeps serving: an open that cannot be routed is a clear 503 before any output
    again = httpx.post(
        cluster.entry.http_url + "/v1/completions",
        json={**GREEDY, "stream": False},
        headers={"Authorization": "Bearer tsk_alice"},
        timeout=30,
    )
    assert again.status_code == 503 and again.json()["error"]["code"] == "no_route"
    # the broken stream paid for what it produced, once; the refused one for nothing
    spent = balance - network.ledger.balance("alice").available
    assert spent > 0 and network.ledger.balance("alice").reserved == 0
    assert network.ledger.check().ok


@pytest.fixture(scope="module")
def hung_network(
    tiny_llama: TinyModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Network]:
    folder: Path = tmp_path_factory.mktemp("hung")
    url = f"sqlite:///{folder / 'ledger.db'}"
    owner = SqlLedger.open(url, "owner")
    owner.authorize_entry("entry-1")
    owner.open_account("alice")
    owner.deposit("alice", 10_000_000)
    owner.add_api_key("alice", "tsk_alice")
    options = {"ledger_url": url, "ledger_actor": "entry-1", "step_timeout_s": 6.0}
    # the middle nodes (indexes 1, 2) give up on a hung last node before the entry does
    middle = {i: {"step_timeout_s": 2.0} for i in (1, 2)}
    with LocalCluster(
        tiny_llama.path, 3, subprocesses=True, replicas=2, entry_options=options,
        node_options=middle, ban_s=300,
    ) as cluster:  # fmt: skip
        yield Network(cluster, owner, signers(cluster))
    owner.close()


def test_a_node_that_hangs_is_routed_around_after_the_step_timeout(
    hung_network: Network,
) -> None:
    """A node that stops answering without dying (SIGSTOP) counts as lost once the hop
    before it has waited --step-timeout, and the answer goes on, token for token."""
    cluster = hung_network.cluster
    reference = stream(cluster, GREEDY)
    frozen: list[RunningNode] = []

    def freeze_last() -> None:
        frozen.append(cluster.by_url(route_in_use(cluster)[-1]))
        assert frozen[-1].process is not None
        frozen[-1].process.send_signal(signal.SIGSTOP)

    try:
        hung = stream(cluster, GREEDY, 5, freeze_last)
    finally:
        for node in frozen:
            assert node.process is not None
            node.process.send_signal(signal.SIGCONT)
    assert hung.error is None, hung.error
    assert hung.token_ids == reference.token_ids
    assert cluster.network_state()["counters"]["failovers"] >= 1
    assert hung_network.ledger.check().ok
