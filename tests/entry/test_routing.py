"""Route choice and the registry's state, without servers."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from teeshard.entry.registry import (
    NetworkFileError,
    NetworkNode,
    ProbeAttestationError,
    ProbeResult,
    Registry,
    load_network,
)
from teeshard.entry.routing import NodeView, NoRouteError, choose_route
from teeshard.model.layer_range import LayerRange


def node(url: str, layers: str, **state: object) -> NodeView:
    return NodeView(url, LayerRange.parse(layers), **{"attestation": "verified", **state})  # type: ignore[arg-type]


def test_a_route_covers_every_layer_after_the_entry_in_order() -> None:
    nodes = [node("wss://c:3", "8:12"), node("wss://b:2", "4:8"), node("wss://d:4", "12:16")]
    assert choose_route(nodes, 4, 16, now=0) == ("wss://b:2", "wss://c:3", "wss://d:4")


def test_ranges_of_replicas_need_not_line_up() -> None:
    nodes = [node("wss://a:1", "4:10"), node("wss://b:2", "4:8"), node("wss://c:3", "8:16")]
    # a's 4:10 leads nowhere (nothing starts at 10): b then c is the only cover
    assert choose_route(nodes, 4, 16, now=0) == ("wss://b:2", "wss://c:3")


def test_least_load_first_then_fewest_hops() -> None:
    nodes = [
        node("wss://long1:1", "4:8", load=0),
        node("wss://long2:2", "8:16", load=0),
        node("wss://short:3", "4:16", load=1),
    ]
    assert choose_route(nodes, 4, 16, now=0) == ("wss://long1:1", "wss://long2:2")
    even = [*nodes[:2], node("wss://short:3", "4:16", load=0)]
    assert choose_route(even, 4, 16, now=0) == ("wss://short:3",)


def test_equal_routes_spread_by_salt() -> None:
    nodes = [node(f"wss://r{i}:1", "2:4") for i in range(3)]
    chosen = Counter(choose_route(nodes, 2, 4, now=0, salt=salt)[0] for salt in range(9))
    assert chosen == {"wss://r0:1": 3, "wss://r1:1": 3, "wss://r2:1": 3}


@pytest.mark.parametrize(
    ("state", "why"),
    [
        ({"attestation": "failed"}, "attestation failed"),
        ({"attestation": "unknown"}, "attestation unknown"),
        ({"healthy": False}, "unreachable"),
        ({"banned_until": 10.0}, "banned for 5s"),
    ],
)
def test_unusable_nodes_are_never_chosen(state: dict[str, object], why: str) -> None:
    bad = node("wss://bad:1", "2:4", **state)
    good = node("wss://good:1", "2:4")
    assert {choose_route([bad, good], 2, 4, now=5.0, salt=s) for s in range(4)} == {
        ("wss://good:1",)
    }
    with pytest.raises(NoRouteError) as refused:
        choose_route([bad], 2, 4, now=5.0)
    assert refused.value.gap == 2 and why in refused.value.message


def test_no_route_names_the_first_uncovered_layer() -> None:
    with pytest.raises(NoRouteError) as refused:
        choose_route([node("wss://a:1", "2:3")], 2, 4, now=0)
    assert refused.value.gap == 3 and "no node in the network serves layers from 3" in str(
        refused.value.message
    )


def test_the_network_file_parses_and_refuses_nonsense(tmp_path: Path) -> None:
    good = tmp_path / "network.toml"
    good.write_text(
        '[[nodes]]\nurl = "wss://10.0.0.2:8001/pipeline"\nlayers = "2:4"\n'
        '[[nodes]]\nurl = "wss://10.0.0.3:8001"\nlayers = "2:4"\n'
    )
    assert load_network(good) == [
        NetworkNode("wss://10.0.0.2:8001", LayerRange(2, 4)),
        NetworkNode("wss://10.0.0.3:8001", LayerRange(2, 4)),
    ]
    for text, says in [
        ('[[nodes]]\nurl = "ws://10.0.0.2:8001"\nlayers = "2:4"\n', "url"),  # no RA-TLS
        ('[[nodes]]\nurl = "wss://a:1"\nlayers = "4:2"\n', "layers"),
        ('[[nodes]]\nurl = "wss://a:1"\nlayers = "2:4"\nweight = 3\n', "weight"),
        ('[[nodes]]\nurl = "wss://a:1"\nlayers = "2:4"\n' * 2, "listed twice"),
        ("nodes = 3", "nodes"),
    ]:
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(NetworkFileError, match=says):
            load_network(bad)


async def test_the_registry_probes_bans_and_counts_load() -> None:
    answers: dict[str, object] = {
        "wss://a:1": ProbeResult("aa" * 32, LayerRange(2, 4)),
        "wss://b:1": ProbeAttestationError("simulated evidence of another machine"),
        "wss://c:1": OSError("connection refused"),
        "wss://d:1": ProbeResult("dd" * 32, LayerRange(2, 3)),  # listed as 2:4
    }

    async def probe(url: str) -> ProbeResult:
        answer = answers[url]
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, ProbeResult)
        return answer

    nodes = [NetworkNode(url, LayerRange(2, 4)) for url in answers]
    registry = Registry(nodes, start=2, num_layers=4, prober=probe, ban_s=60)
    with pytest.raises(NoRouteError):  # nothing is verified before the first probe
        registry.choose()
    await registry.probe_all()
    states = {n["url"]: n for n in registry.describe()["nodes"]}
    assert states["wss://a:1"]["attestation"] == "verified" and states["wss://a:1"]["usable"]
    assert states["wss://b:1"]["attestation"] == "failed"
    assert not states["wss://c:1"]["healthy"] and "refused" in states["wss://c:1"]["problem"]
    assert states["wss://d:1"]["attestation"] == "failed"
    assert {registry.choose() for _ in range(5)} == {("wss://a:1",)}

    registry.hold("s1", ("wss://a:1",))
    assert registry.records["wss://a:1"].sessions == 1
    registry.drop("s1")
    registry.drop("s1")  # idempotent
    assert registry.records["wss://a:1"].sessions == 0

    registry.ban("wss://a:1/pipeline", "lost mid-session")
    assert registry.counters.bans == {"wss://a:1": 1}
    with pytest.raises(NoRouteError, match="banned"):
        registry.choose()
