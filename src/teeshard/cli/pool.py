"""``teeshard pool``: nodes and revenue (list, register, admit, edit, remove, distribute, withdraw).

``settle-epoch`` and ``claim`` (the bridge to settlement on chain) live in ``cli.epochs``.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

from rich.console import Console
from rich.table import Table

from teeshard.attest import Policy
from teeshard.cli import epochs as bridge
from teeshard.cli.attest import add_policy_options
from teeshard.cli.epochs import add_chain_options
from teeshard.cli.ledger import Command, add_ledger_options, ledger_command
from teeshard.ledger.interface import Ledger
from teeshard.ledger.registration import (
    AttestVerifier,
    ExpectedShards,
    admit_from_url,
    default_verifier,
    register_from_url,
    renew_admissions,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("pool", help="contribution pool: nodes, distribution, payouts")
    commands = parser.add_subparsers(dest="pool_command", required=True, metavar="COMMAND")

    def sub(name: str, help: str, func: Command) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help)
        add_ledger_options(p)
        p.set_defaults(func=func)
        return p

    sub("list", "registered nodes with the work they served", list_nodes)
    for name, func, help in (
        ("register", register_node, "verify a node's attestation and register it (as operator)"),
        ("admit", admit_node, "verify a registered node's attestation and admit it (entry/owner)"),
    ):
        p = sub(name, help, func)
        p.add_argument(
            "--url", required=True, help="the node's http(s) URL (serves /v1/attestation)"
        )
        p.add_argument(
            "--expected",
            default=None,
            help="file of the model's expected shard hashes: {model, shards: {'0:11': HASH}} "
            "(default: the --policy file's [[manifests]])",
        )
        p.add_argument(
            "--expected-hash", action="append", default=[], help="an expected manifest hash"
        )
        p.add_argument("--node-id", default=None, help="the node's id (default: URL host:port)")
        add_policy_options(p)
    p = sub("readmit", "attest every registered node again: admit it for another epoch", readmit)
    p.add_argument("--expected", default=None, help="as for admit")
    p.add_argument("--expected-hash", action="append", default=[], help="as for admit")
    add_policy_options(p)
    p = sub("edit", "change a node's URL or manifest hash (its operator)", edit_node)
    p.add_argument("node_id")
    p.add_argument("--url", default=None)
    p.add_argument("--manifest-hash", default=None, help="a new hash needs admission again")
    p = sub("remove", "remove a node (its operator); served work is still paid", remove_node)
    p.add_argument("node_id")
    sub("distribute", "pay each operator what its nodes' verified work earned", distribute)
    p = sub("withdraw", "pay out the caller's earnings (default: all)", withdraw)
    p.add_argument("amount", nargs="?", type=int, default=None)
    p.add_argument("--treasury", action="store_true", help="the treasury's earnings (owner)")
    p = sub("settle-epoch", "escrow in, earnings and refunds out: post the epoch's root (owner, "
            "with a settler key)", bridge.settle_epoch)  # fmt: skip
    add_chain_options(p)
    p.add_argument("--confirmations", type=int, default=0, help="blocks to wait (default 0)")
    p.add_argument("--no-distribute", action="store_true", help="pay out earnings only")
    p = sub("claim", "claim an account's amount of a posted epoch on chain (any key)", bridge.claim)
    add_chain_options(p)
    p.add_argument("--account", required=True, help="the wallet address to credit")
    p.add_argument("--number", type=int, default=None, help="the epoch (default the latest)")
    p.add_argument("--withdraw", action="store_true", help="then withdraw it (its own key)")


@ledger_command
def list_nodes(args: argparse.Namespace, ledger: Ledger) -> int:
    table = Table(title=f"pool: {ledger.pool()} tokens to distribute")
    numbers = ("served", "earned", "total")
    for column in ("node", "operator", "url", "layers", "manifest", "admitted", *numbers):
        table.add_column(column, justify="right" if column in numbers else "left")
    for n in ledger.nodes():
        table.add_row(
            n.node_id,
            n.operator,
            n.url,
            n.layers,
            n.manifest_hash[:12] + "…",
            _until(n.admitted_until) if n.admitted else "no",
            str(n.served_tokens),
            str(n.earned),
            str(n.served_total),
        )
    Console().print(table)
    return 0


def _until(at: float) -> str:
    if not at:
        return "yes"
    return "until " + datetime.fromtimestamp(at, UTC).strftime("%H:%M:%S UTC")


def _checks(args: argparse.Namespace) -> tuple[ExpectedShards, AttestVerifier]:
    """The expected shards and the verifier the options name (one policy file read)."""
    policy = Policy.load(args.policy) if args.policy else None
    verifier = default_verifier(
        policy,
        allow_simulated=args.allow_simulated,
        collateral=args.collateral,
        pccs_url=args.pccs_url,
    )
    if args.expected:
        return ExpectedShards.load(args.expected), verifier
    if args.expected_hash:
        return ExpectedShards.of(args.expected_hash), verifier
    if policy is not None and policy.manifests:
        return ExpectedShards.from_policy(policy), verifier
    raise ValueError(
        "name the model's expected shard hashes: --expected FILE, --expected-hash HASH, "
        "or a --policy file listing [[manifests]]"
    )


@ledger_command
def register_node(args: argparse.Namespace, ledger: Ledger) -> int:
    expected, verifier = _checks(args)
    result = register_from_url(ledger, args.url, expected, verifier, node_id=args.node_id)
    for note in result.verified.notes:
        print(f"{'WARNING' if note.startswith('INSECURE') else 'checked'}: {note}")
    print(f"registered node {result.node.node_id} ({result.node.manifest_hash[:12]}…)")
    if not result.admitted:
        print("awaiting admission: an entry node runs 'teeshard pool admit --url ...'")
    return 0


@ledger_command
def admit_node(args: argparse.Namespace, ledger: Ledger) -> int:
    expected, verifier = _checks(args)
    record = admit_from_url(ledger, args.url, expected, verifier, node_id=args.node_id)
    print(f"admitted node {record.node_id}")
    return 0


@ledger_command
def readmit(args: argparse.Namespace, ledger: Ledger) -> int:
    expected, verifier = _checks(args)
    result = renew_admissions(ledger, expected, verifier)
    for node_id in result.renewed:
        print(f"admitted node {node_id} for another epoch")
    for node_id, reason in sorted(result.refused.items()):
        print(f"not renewed: {node_id}: {reason}")
    return 0 if not result.refused else 1


@ledger_command
def edit_node(args: argparse.Namespace, ledger: Ledger) -> int:
    record = ledger.edit_node(args.node_id, url=args.url, manifest_hash=args.manifest_hash)
    state = "admitted" if record.admitted else "not admitted"
    print(f"node {record.node_id}: {record.url}, manifest {record.manifest_hash[:12]}…, {state}")
    return 0


@ledger_command
def remove_node(args: argparse.Namespace, ledger: Ledger) -> int:
    ledger.remove_node(args.node_id)
    print(f"removed node {args.node_id}")
    return 0


@ledger_command
def distribute(args: argparse.Namespace, ledger: Ledger) -> int:
    result = ledger.distribute()
    kept = f"treasury {result.treasury}" if result.treasury else f"kept {result.remainder}"
    print(f"pool {result.pool_before}: distributed {result.distributed}, {kept}")
    for operator, share in sorted(result.shares.items()):
        print(f"  {operator}: {share}")
    return 0


@ledger_command
def withdraw(args: argparse.Namespace, ledger: Ledger) -> int:
    if args.treasury:
        from teeshard.cli.ledger import _sql

        entry = _sql(ledger, "withdraw --treasury").withdraw_treasury(args.amount)
    else:
        entry = ledger.withdraw(args.amount)
    print(f"withdrew {-entry.earnings} tokens for {entry.account}")
    return 0
