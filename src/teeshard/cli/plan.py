"""``teeshard plan``: print how a checkpoint splits over N nodes."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from teeshard.model.checkpoint import Checkpoint
from teeshard.model.plan import plan_checkpoint


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("plan", help="print the layer split of a model over N nodes")
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    parser.add_argument("--nodes", type=int, default=2, help="number of nodes (default 2)")
    parser.add_argument(
        "--weights",
        help="comma-separated relative capacity per node, e.g. memory in GiB '16,8'; "
        "default: equal layer counts",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    checkpoint = Checkpoint(args.model)
    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    plans = plan_checkpoint(checkpoint, args.nodes, weights)
    table = Table(
        title=f"{checkpoint.name}: {checkpoint.spec.num_layers} layers over {args.nodes} nodes"
    )
    for column in ("node", "layers", "holds", "param bytes", "MiB"):
        table.add_column(column, justify="right" if column in ("param bytes", "MiB") else "left")
    for index, plan in enumerate(plans):
        holds = []
        if plan.layers.is_first():
            holds.append("embedding")
        holds.append(f"{len(plan.layers)} blocks")
        if plan.layers.is_last(checkpoint.spec.num_layers):
            holds.append("norm + lm_head")
        table.add_row(
            str(index),
            f"[{plan.layers.start}, {plan.layers.end})",
            ", ".join(holds),
            f"{plan.param_bytes:,}",
            f"{plan.param_bytes / 2**20:,.1f}",
        )
    Console().print(table)
    return 0
