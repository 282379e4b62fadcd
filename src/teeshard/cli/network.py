"""``teeshard network --url URL``: the entry node's network as a table.

Reads ``GET /v1/network``. The node list (attestation, health, load, bans,
routes in use) is detail: it needs the admin token (``$TEESHARD_ADMIN_TOKEN``
or ``--admin-token``) unless the entry binds loopback; without it the table
shows how many usable nodes serve each range.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from teeshard.cli.errors import CommandError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("network", help="show an entry node's network of replicas")
    parser.add_argument("--url", required=True, help="the entry node, e.g. http://127.0.0.1:8000")
    parser.add_argument(
        "--admin-token", default=None, help="for the node detail (default $TEESHARD_ADMIN_TOKEN)"
    )
    parser.add_argument("--json", action="store_true", help="print the JSON as it came")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    token = args.admin_token or os.environ.get("TEESHARD_ADMIN_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        reply = httpx.get(args.url.rstrip("/") + "/v1/network", headers=headers, timeout=10)
        reply.raise_for_status()
        data = reply.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise CommandError(f"cannot read {args.url}/v1/network: {exc}") from None
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    console = Console()
    if not console.is_terminal:  # piped: no wrapping at 80 columns
        console = Console(width=200)
    for table in network_tables(data):
        console.print(table)
    return 0


def network_tables(data: dict[str, Any]) -> list[Table]:
    """The tables for a ``/v1/network`` answer (pure: tested without a server)."""
    if data.get("routing") != "registry":
        table = Table(title="static chain: this entry has no --network")
        table.add_column("routing")
        table.add_row("every session takes the entry's --next")
        return [table]
    if not data.get("detail"):
        table = Table(title=f"ranges after layer {data['start']} (of {data['num_layers']})")
        table.add_column("layers")
        table.add_column("usable nodes", justify="right")
        for item in data["ranges"]:
            table.add_row(item["layers"], str(item["usable_nodes"]))
        return [table]
    nodes = Table(title=f"nodes after layer {data['start']} (of {data['num_layers']})")
    for column in ("layers", "url", "attestation", "certificate", "health", "sessions", "ban"):
        nodes.add_column(column, justify="right" if column == "sessions" else "left")
    for node in data["nodes"]:
        health = "ok" if node["healthy"] else "unreachable"
        ban = f"{node['banned_for_s']:.0f}s: {node['ban_reason']}" if node["ban_reason"] else ""
        attestation = node["attestation"]
        if node["problem"] and attestation == "failed":
            attestation = f"failed: {node['problem'][:60]}"
        nodes.add_row(
            node["layers"], node["url"], attestation, (node["fingerprint"] or "")[:16],
            health, str(node["sessions"]), ban,
        )  # fmt: skip
    counters = data["counters"]
    summary = Table(title="failover")
    for column in ("routes in use", "failovers", "retries", "bans"):
        summary.add_column(column, justify="right")
    summary.add_row(
        str(len(data["routes"])),
        str(counters["failovers"]),
        str(counters["retries"]),
        str(sum(counters["bans"].values())),
    )
    return [nodes, summary]
