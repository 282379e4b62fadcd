"""The node registry rebuilt from the contract's events alone.

An indexer (or an entry node starting cold on an RPC without state queries)
replays ``NodeRegistered`` (which carries the model and layers), admissions,
edits, removals, evictions, ``Served`` and ``Paid`` in log order and gets the
same registry the contract stores. ``replay`` is pure; ``rebuild`` reads the
log (paged) and calls it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from teeshard.ledger.evm.events import latest_block, logs
from teeshard.ledger.interface import NodeRecord

if TYPE_CHECKING:
    from teeshard.ledger.evm.contract import ContractClient

NODE_EVENTS = (
    "NodeRegistered",
    "NodeAdmitted",
    "NodeEdited",
    "NodeRemoved",
    "NodeEvicted",
    "Served",
    "Paid",
)


@dataclass(frozen=True)
class NodeEvent:
    """One decoded node event: its name, its arguments, and its place in the log."""

    name: str
    args: dict[str, Any]
    block: int
    index: int


def replay(found: Iterable[NodeEvent]) -> list[NodeRecord]:
    """The registry after ``found`` (any order: sorted by place in the log here)."""
    nodes: dict[bytes, NodeRecord] = {}
    removed: set[bytes] = set()
    totals: dict[bytes, int] = {}  # served_total survives re-registration
    for event in sorted(found, key=lambda e: (e.block, e.index)):
        key, args = bytes(event.args["node_id"]), event.args
        current = nodes.get(key)
        if event.name == "NodeRegistered":
            nodes[key] = NodeRecord(
                args["name"],
                str(args["operator"]),
                args["url"],
                bytes(args["manifest_hash"]).hex(),
                args["model"],
                args["layers"],
                False,
                0,
                totals.get(key, 0),
            )
            removed.discard(key)
        elif current is None:
            continue
        elif event.name == "NodeAdmitted":
            nodes[key] = replace(current, admitted=True)
        elif event.name == "NodeEdited":
            nodes[key] = replace(
                current,
                url=args["url"],
                manifest_hash=bytes(args["manifest_hash"]).hex(),
                admitted=bool(args["admitted"]),
            )
        elif event.name in ("NodeRemoved", "NodeEvicted"):
            nodes[key] = replace(current, admitted=False)
            removed.add(key)
        elif event.name == "Served":
            tokens = int(args["tokens"])
            totals[key] = totals.get(key, 0) + tokens
            nodes[key] = replace(
                current,
                served_tokens=current.served_tokens + tokens,
                served_total=current.served_total + tokens,
            )
        elif event.name == "Paid":
            nodes[key] = replace(current, served_tokens=0)
    return sorted((n for key, n in nodes.items() if key not in removed), key=lambda n: n.node_id)


def rebuild(ledger: ContractClient) -> list[NodeRecord]:
    """The registry from the log, as ``EvmLedger.nodes()`` reads it from storage."""
    last = latest_block(ledger)
    found = [
        NodeEvent(name, dict(log["args"]), int(log["blockNumber"]), int(log["logIndex"]))
        for name in NODE_EVENTS
        for log in logs(ledger, name, last=last)
    ]
    return replay(found)
