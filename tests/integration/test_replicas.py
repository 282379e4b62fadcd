"""Replicas in one process: load spreads over them; a replica that fails attestation
(other weights than the policy names) is never chosen and never sees a hidden state."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from tests.checkpoints import TinyModel, build_tiny_model
from tests.cluster import LocalCluster, RunningNode


@pytest.fixture(scope="module")
def cluster(
    tiny_llama: TinyModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    other = build_tiny_model("llama", tmp_path_factory.mktemp("impostor-llama"), seed=1)
    # nodes: 0 the entry (0:2), then 1, 2, 3 serving 2:4; node 3 loads other weights
    with LocalCluster(
        tiny_llama.path, 2, replicas=3, model_overrides={3: other.path}, expect_usable=2
    ) as running:
        yield running


def steps(node: RunningNode) -> float:
    for line in node.get("/metrics").text.splitlines():
        if line.startswith("teeshard_steps_total{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no steps counter")


def test_the_impostor_replica_is_refused_and_never_used(cluster: LocalCluster) -> None:
    impostor = cluster.nodes[3]
    state = {n["url"]: n for n in cluster.network_state()["nodes"]}
    seen = state[f"wss://127.0.0.1:{impostor.config.port}"]
    assert seen["attestation"] == "failed" and not seen["usable"]
    assert "manifest" in seen["problem"]
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 4, "temperature": 0}
    for _ in range(6):
        reply = httpx.post(cluster.entry.http_url + "/v1/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
    assert steps(impostor) == 0 and impostor.get("/health").json()["sessions"]["open"] == 0


async def test_concurrent_sessions_spread_over_replicas(cluster: LocalCluster) -> None:
    good = cluster.nodes[1:3]
    before = [steps(n) for n in good]
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 12, "temperature": 0}
    async with httpx.AsyncClient(base_url=cluster.entry.http_url, timeout=120) as client:
        replies = await asyncio.gather(
            *(client.post("/v1/completions", json=body) for _ in range(6))
        )
    assert all(r.status_code == 200 for r in replies)
    assert len({r.json()["choices"][0]["text"] for r in replies}) == 1  # same answer anywhere
    gained = [steps(n) - b for n, b in zip(good, before, strict=True)]
    assert all(g > 0 for g in gained), gained
    assert cluster.network_state()["routes"] == []  # every session's route was let go


def test_the_network_command_and_the_entry_metrics(
    cluster: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    from teeshard.cli import main

    assert main(["network", "--url", cluster.entry.http_url]) == 0
    table = capsys.readouterr().out
    for node in cluster.nodes[1:]:
        assert str(node.config.port) in table
    assert "verified" in table and "failed" in table and "failovers" in table
    metrics = cluster.entry.get("/metrics").text
    assert "teeshard_failovers_total" in metrics and "teeshard_bans_total" in metrics
    assert "teeshard_network_usable_nodes{" in metrics and " 2.0" in metrics


def test_the_public_network_view_counts_usable_nodes_only() -> None:
    from teeshard.cli.network import network_tables

    public = {"routing": "registry", "detail": False, "start": 2, "num_layers": 4,
              "ranges": [{"layers": "2:4", "usable_nodes": 2}]}  # fmt: skip
    [table] = network_tables(public)
    assert [c.header for c in table.columns] == ["layers", "usable nodes"]
    assert [list(c.cells) for c in table.columns] == [["2:4"], ["2"]]
