"""The contribution pool as the entry's network: the nodes the ledger admits for the model,
re-read before every probe round, so many entry nodes on many hosts share one view."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from tests.ledger.ledger_harness import World
from tests.ledger.trust_kit import KitNode

from teeshard.entry.registry import NetworkNode, Registry, ledger_nodes
from teeshard.ledger import Ledger
from teeshard.model import LayerRange


@dataclass
class TlsNode(KitNode):
    """A node registered at its HTTPS address, as ``teeshard pool register`` does."""

    @property
    def url(self) -> str:
        return f"https://{self.node_id}:8443"


def admit(world: World, node_id: str, layers: str, model: str = "m") -> Ledger:
    """Register ``node_id`` by a new operator and admit it; the operator's ledger."""
    start, _, end = layers.partition(":")
    node = TlsNode(node_id, "c" * 64, LayerRange(int(start), int(end)))
    operator, as_operator = world.new_account()
    info = node.info()
    info = type(info)(info.node_id, info.url, info.manifest_hash, model, info.layers)
    as_operator.register_node(info, claim=node.claim(operator, as_operator))
    world.owner.admit_node(node_id, node.manifest, attested=node.attested(operator, world.owner))
    return as_operator


def test_only_admitted_nodes_of_the_model_are_the_network(sql: World) -> None:
    admit(sql, "node-a", "2:4")
    admit(sql, "node-b", "2:4")
    admit(sql, "other", "2:4", model="another-model")
    pending = TlsNode("pending", "d" * 64, LayerRange(2, 4))
    operator, as_operator = sql.new_account()
    as_operator.register_node(pending.info(), claim=pending.claim(operator, as_operator))
    nodes = ledger_nodes(sql.owner, "m")
    assert sorted(nodes, key=lambda n: n.url) == [
        NetworkNode("wss://node-a:8443", LayerRange(2, 4)),
        NetworkNode("wss://node-b:8443", LayerRange(2, 4)),
    ]


def test_the_registry_follows_the_ledger(sql: World) -> None:
    fixed = NetworkNode("wss://from-the-file:9000", LayerRange(2, 4))
    registry = Registry([fixed], start=2, num_layers=4, source=lambda: ledger_nodes(sql.owner, "m"))
    asyncio.run(registry.probe_all())
    assert set(registry.records) == {fixed.url}
    operator = admit(sql, "node-a", "2:4")  # newly admitted: routed to from the next round
    asyncio.run(registry.probe_all())
    assert set(registry.records) == {fixed.url, "wss://node-a:8443"}
    assert registry.choose()  # a route exists over the nodes now known
    operator.remove_node("node-a")  # its operator takes it out of the pool: no longer used
    asyncio.run(registry.probe_all())
    assert set(registry.records) == {fixed.url}  # the network file's node stays


def test_a_failing_source_keeps_the_last_view(sql: World) -> None:
    calls = {"n": 0}

    def flaky() -> list[NetworkNode]:
        calls["n"] += 1
        if calls["n"] > 1:
            raise ConnectionError("the database went away")
        return [NetworkNode("wss://node-a:8443", LayerRange(2, 4))]

    registry = Registry([], start=2, num_layers=4, source=flaky)
    asyncio.run(registry.probe_all())
    asyncio.run(registry.probe_all())
    assert set(registry.records) == {"wss://node-a:8443"}
