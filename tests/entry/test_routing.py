"""Route choice and the registry's state, without servers."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from teeshard.entry.node_load import parse_metrics, recent_step_ms
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


# -- the nodes' measured step load ---------------------------------------------------


def chosen(nodes: list[NodeView], start: int = 2, end: int = 4) -> set[tuple[str, ...]]:
    """Every route choice over a few salts: a decided choice gives one route."""
    return {choose_route(nodes, start, end, now=0, salt=salt) for salt in range(6)}


@pytest.mark.parametrize(
    ("busy", "why"),
    [
        ({"step_ms": 40.0}, "its steps take four times as long"),
        ({"sessions": 3}, "other entries hold three sessions on it"),
        ({"in_flight": 2}, "two steps were running at the probe"),
        ({"load": 1}, "this entry holds a session on it"),
    ],
)
def test_a_measured_busy_or_slow_replica_is_avoided(busy: dict[str, object], why: str) -> None:
    idle = {"step_ms": 10.0}
    nodes = [node("wss://r0:1", "2:4", **{**idle, **busy}), node("wss://r1:1", "2:4", **idle)]
    assert chosen(nodes) == {("wss://r1:1",)}, why
    even = [node("wss://r0:1", "2:4", **idle), node("wss://r1:1", "2:4", **idle)]
    assert chosen(even) == {("wss://r0:1",), ("wss://r1:1",)}  # equal: spread by salt


def test_a_fast_busy_node_against_a_slow_idle_one() -> None:
    # 10 ms steps shared with 2 sessions (about 30 ms a token) lose to 25 ms steps alone
    fast = node("wss://fast:1", "2:4", step_ms=10.0, sessions=2)
    slow = node("wss://slow:1", "2:4", step_ms=25.0)
    assert chosen([fast, slow]) == {("wss://slow:1",)}
    assert chosen([replace(fast, sessions=1), slow]) == {("wss://fast:1",)}  # 20 ms < 25 ms


def test_an_unmeasured_node_is_estimated_from_the_measured_per_layer_time() -> None:
    # 4:8 and 8:16 measured at 1 ms a layer (12 ms, two hops); 4:16 not measured yet:
    # estimated at 12 ms, one hop fewer, so it wins until it holds a session
    long = [node("wss://a:1", "4:8", step_ms=4.0), node("wss://b:1", "8:16", step_ms=8.0)]
    short = node("wss://c:1", "4:16")
    assert chosen([*long, short], 4, 16) == {("wss://c:1",)}
    assert chosen([*long, replace(short, load=1)], 4, 16) == {("wss://a:1", "wss://b:1")}
    slow_layers = [replace(n, step_ms=n.step_ms * 3) for n in long]  # type: ignore[operator]
    assert chosen([*slow_layers, short], 4, 16) == {("wss://c:1",)}  # estimated slow too


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


def metrics(steps: int, seconds: float, sessions: int = 1, in_flight: int = 0) -> str:
    """A node's /metrics as ``teeshard.node.metrics`` renders them."""
    labels = '{model="tiny",layers="2:4"}'
    return "\n".join([
        "# HELP teeshard_steps_total Pipeline steps run on this node",
        "# TYPE teeshard_steps_total counter",
        f"teeshard_steps_total{labels} {steps}",
        f"teeshard_step_seconds_total{labels} {seconds}",
        f"teeshard_sessions_open{labels} {sessions}",
        f"teeshard_pipeline_frames_in_flight{labels} {in_flight}",
        f"teeshard_cache_reserved_tokens{labels} 64",
    ])  # fmt: skip


async def test_the_registry_reads_each_nodes_step_load_at_its_probe() -> None:
    texts = {"wss://a:1": [metrics(10, 0.1), metrics(30, 0.9, sessions=4, in_flight=2)],
             "wss://b:1": [metrics(10, 0.1), metrics(30, 0.3)]}  # fmt: skip
    pems = {"wss://a:1": b"pem-a", "wss://b:1": b"pem-b"}
    read: list[tuple[str, bytes]] = []

    async def probe(url: str) -> ProbeResult:
        return ProbeResult(url[6:7] * 64, LayerRange(2, 4), pems[url])

    async def reader(url: str, pem: bytes) -> str:
        read.append((url, pem))
        return texts[url].pop(0)

    nodes = [NetworkNode(url, LayerRange(2, 4)) for url in texts]
    registry = Registry(nodes, start=2, num_layers=4, prober=probe, load_reader=reader)
    await registry.probe_all()
    assert sorted(read) == sorted(pems.items())  # pinned to the certificate just verified
    assert {registry.records[u].step_ms for u in texts} == {None}  # one sample: no rate yet
    await registry.probe_all()
    a, b = registry.records["wss://a:1"], registry.records["wss://b:1"]
    assert (a.step_ms, b.step_ms) == (pytest.approx(40.0), pytest.approx(10.0))
    state = {n["url"]: n["load"] for n in registry.describe()["nodes"]}
    assert state["wss://a:1"] == {"step_ms": 40.0, "sessions": 4, "in_flight": 2}
    # a's steps are slower and it is busy: every new session goes to b
    assert {registry.choose() for _ in range(4)} == {("wss://b:1",)}


@pytest.mark.parametrize(
    "answer",
    [PermissionError("403: metrics are for the admin token"), "not metrics at all",
     metrics(5, 0.1).replace("teeshard_steps_total", "other"), metrics(5, -1.0)],
)  # fmt: skip
async def test_a_node_whose_load_cannot_be_read_is_routed_by_sessions(answer: object) -> None:
    async def probe(url: str) -> ProbeResult:
        return ProbeResult("aa" * 32, LayerRange(2, 4), b"pem")

    async def reader(url: str, pem: bytes) -> str:
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, str)
        return answer

    registry = Registry(
        [NetworkNode("wss://a:1", LayerRange(2, 4))], 2, 4, prober=probe, load_reader=reader
    )
    await registry.probe_all()
    record = registry.records["wss://a:1"]
    assert record.attestation == "verified" and record.sample is None
    assert registry.describe()["nodes"][0]["load"] is None
    assert registry.choose() == ("wss://a:1",)  # still usable


def test_step_time_between_samples() -> None:
    first = parse_metrics(metrics(10, 0.5), at=0.0)
    assert recent_step_ms(None, first, None) is None
    assert recent_step_ms(first, parse_metrics(metrics(20, 1.5), at=5.0), None) == 100.0
    assert recent_step_ms(first, parse_metrics(metrics(10, 0.5), at=5.0), 7.0) == 7.0  # idle
    assert recent_step_ms(first, parse_metrics(metrics(2, 0.1), at=5.0), 7.0) is None  # restart


async def test_a_burst_of_sessions_chosen_at_once_spreads_over_measured_replicas() -> None:
    """Sessions chosen before any of them opened (a concurrent burst): each chosen route
    counts as load at once, so measured replicas that differ a little share the burst."""
    texts = {
        "wss://a:1": [metrics(10, 0.1), metrics(30, 0.162)],  # 3.1 ms a step
        "wss://b:1": [metrics(10, 0.1), metrics(30, 0.168)],  # 3.4 ms a step
    }

    async def probe(url: str) -> ProbeResult:
        return ProbeResult(url[6:7] * 64, LayerRange(2, 4), b"pem")

    async def reader(url: str, pem: bytes) -> str:
        return texts[url].pop(0)

    nodes = [NetworkNode(url, LayerRange(2, 4)) for url in texts]
    registry = Registry(nodes, start=2, num_layers=4, prober=probe, load_reader=reader)
    await registry.probe_all()
    await registry.probe_all()
    burst = Counter(registry.choose()[0] for _ in range(6))
    assert burst == {"wss://a:1": 3, "wss://b:1": 3}
    for index, url in enumerate(sorted(burst.elements())):  # they open: held, not opening
        registry.hold(f"s{index}", (url,))
    assert not registry._opening and registry.records["wss://a:1"].sessions == 3
