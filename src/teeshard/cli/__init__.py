"""The ``teeshard`` command: one module per command group, each with ``register``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from teeshard.cli.errors import CommandError

# Each module defines register(subparsers) and sets a ``func`` default on its parsers.
COMMAND_MODULES = (
    "teeshard.cli.plan",
    "teeshard.cli.node",
    "teeshard.cli.up",
    "teeshard.cli.network",
    "teeshard.cli.chat",
    "teeshard.cli.demo",
    "teeshard.cli.attest",
    "teeshard.cli.verify_receipt",
    "teeshard.cli.ledger",
    "teeshard.cli.pool",
    "teeshard.cli.chain",
    "teeshard.cli.accel",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="teeshard", description="Confidential split inference of LLMs across TEE nodes."
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # one line per request or per migration plugin is noise
    for noisy in ("httpx", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, CommandError) as exc:
        # Bad input on the command line: one clear line, no traceback.
        print(f"teeshard: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
