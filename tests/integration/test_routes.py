"""Routes named in ``open``: each hop attests the node it is told, with its own policy,
and checks it serves the layers right after its own; attestation failures are never
retried by the entry (no ban, no failover), unlike transport faults."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from teeshard.model.checkpoint import Checkpoint
from teeshard.model.layer_range import LayerRange
from teeshard.model.sampling import SamplingParams
from teeshard.node import DownstreamError
from teeshard.server.local_pipeline import local_policy_toml
from tests.checkpoints import TinyModel, build_tiny_model
from tests.cluster import LocalCluster


@pytest.fixture(scope="module")
def cluster(
    tiny_llama: TinyModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    # node 1 (layers 2:3) expects another model's manifest for the layers after it: the
    # entry's policy admits node 2, node 1's does not
    other = build_tiny_model("llama", tmp_path_factory.mktemp("other-weights"), seed=2)
    ranges = [LayerRange(0, 2), LayerRange(2, 3), LayerRange(3, 4)]
    own = local_policy_toml(Checkpoint(tiny_llama.path), ranges[:2], "float32", "tiny")
    foreign = local_policy_toml(Checkpoint(other.path), ranges[2:], "float32", "tiny")
    strict = Path(tempfile.mkdtemp(prefix="teeshard-policy-")) / "policy.toml"
    strict.write_text(own + "\n" + foreign.split("\n\n", 1)[1])  # without its header
    with LocalCluster(
        tiny_llama.path, 3, ranges=ranges, network=True, policy_overrides={1: strict}
    ) as running:
        yield running


async def test_a_route_to_a_node_of_other_layers_is_refused_before_connecting(
    cluster: LocalCluster,
) -> None:
    entry = cluster.entry
    assert entry.node is not None
    service = entry.node.service
    last = cluster.nodes[2]  # serves 3:4; the entry ends at layer 2
    with pytest.raises(DownstreamError) as refused:
        await entry.acall(
            service.open_session(
                "wrong-layers", 16, SamplingParams(), route=(f"wss://127.0.0.1:{last.config.port}",)
            )
        )
    assert refused.value.code == "attestation_failed"
    assert "do not follow" in refused.value.message
    assert len(service.sessions) == 0 and last.get("/health").json()["sessions"]["open"] == 0


def test_an_attestation_failure_downstream_is_not_retried(cluster: LocalCluster) -> None:
    before = cluster.network_state()["counters"]
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 4, "temperature": 0}
    reply = httpx.post(cluster.entry.http_url + "/v1/completions", json=body, timeout=60)
    assert reply.status_code == 502, reply.text
    error = reply.json()["error"]
    assert error["code"] == "attestation_failed" and "failed attestation" in error["message"]
    after = cluster.network_state()
    assert after["counters"] == before  # no retry, no failover, no ban
    assert all(n["usable"] for n in after["nodes"])
    assert cluster.nodes[2].get("/health").json()["sessions"]["open"] == 0
