"""``teeshard demo``: print the directory of the built-in (shipped, trained) demo checkpoint."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="print the built-in demo model's directory")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from teeshard.model.demo import ensure_demo

    print(ensure_demo())
    return 0
