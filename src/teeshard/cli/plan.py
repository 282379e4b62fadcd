"""``teeshard plan``: print how a checkpoint splits over N nodes, and what each format costs."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from teeshard.model.checkpoint import Checkpoint
from teeshard.model.formats import FORMATS
from teeshard.model.plan import format_bytes, kv_bytes_per_token, plan_checkpoint


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
    # formats that hold the same bytes on every node (int8 and w8a8) share a column
    sizes: dict[tuple[int, ...], list[str]] = {}
    for label, fmt in FORMATS.items():
        per_node = tuple(format_bytes(checkpoint, plan.layers, fmt) for plan in plans)
        sizes.setdefault(per_node, []).append(label)
    memory_columns = [f"{' / '.join(labels)} MiB" for labels in sizes.values()]
    columns = ("node", "layers", "holds", *memory_columns, "KV KiB/token")
    for column in columns:
        table.add_column(
            column, justify="left" if column in ("node", "layers", "holds") else "right"
        )
    for index, plan in enumerate(plans):
        holds = []
        if plan.layers.is_first():
            holds.append("embedding")
        holds.append(f"{len(plan.layers)} blocks")
        if plan.layers.is_last(checkpoint.spec.num_layers):
            holds.append("norm + lm_head")
        memory = [per_node[index] / 2**20 for per_node in sizes]
        kv = [
            kv_bytes_per_token(checkpoint, plan.layers, FORMATS[name]) / 2**10
            for name in ("float32", "bfloat16")
        ]
        table.add_row(
            str(index),
            f"[{plan.layers.start}, {plan.layers.end})",
            ", ".join(holds),
            *(f"{mib:,.1f}" for mib in memory),
            f"{kv[0]:,.1f} / {kv[1]:,.1f}",
        )
    Console().print(table)
    Console().print(
        "memory: the weights a node holds in each --dtype/--quantize format (int8 and w8a8: "
        "int8 block linears and LM head with bfloat16 scales, the embedding in bfloat16; "
        "norms stay float32 in every format); add the KV cache per cached token (float32 / "
        "bfloat16, int8 and w8a8)"
    )
    return 0
