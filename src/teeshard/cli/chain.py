"""``teeshard chain``: a persistent local EVM dev chain (anvil) and contract deployment."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_STATE = Path(".teeshard/anvil-state.json")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("chain", help="local EVM dev chain (anvil) and the contract")
    commands = parser.add_subparsers(dest="chain_command", required=True, metavar="COMMAND")
    p = commands.add_parser("start", help="start anvil with --state FILE (kept across restarts)")
    p.add_argument("--state", type=Path, default=DEFAULT_STATE, help=f"default {DEFAULT_STATE}")
    p.add_argument("--port", type=int, default=8545)
    p.add_argument("--deploy", action="store_true", help="also deploy a ledger contract")
    _deploy_options(p)
    p.set_defaults(func=start)
    p = commands.add_parser("stop", help="stop the anvil started for --state (it saves state)")
    p.add_argument("--state", type=Path, default=DEFAULT_STATE)
    p.set_defaults(func=stop)
    p = commands.add_parser("deploy", help="deploy the ledger contract to a JSON-RPC URL")
    p.add_argument("--rpc", required=True, help="JSON-RPC URL, e.g. http://127.0.0.1:8545")
    _deploy_options(p)
    p.set_defaults(func=deploy)


def _deploy_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wei-per-token", type=int, default=10**9, help="token price (default 1 gwei)")
    p.add_argument(
        "--reservation-timeout",
        type=int,
        default=3600,
        help="seconds after which anyone may release a reservation (default 3600)",
    )
    p.add_argument(
        "--dev-key",
        action="store_true",
        help="sign with anvil's first dev account instead of $TEESHARD_EVM_KEY (dev chains only)",
    )


def start(args: argparse.Namespace) -> int:
    from teeshard.ledger import anvil

    chain = anvil.start(args.state, port=args.port)
    print(f"anvil running (pid {chain.pid}) at {chain.rpc_url}, state in {chain.state}")
    if args.deploy:
        args.rpc = chain.rpc_url
        return deploy(args)
    return 0


def stop(args: argparse.Namespace) -> int:
    from teeshard.ledger import anvil

    if not anvil.stop(args.state):
        print(f"no anvil running for {args.state}", file=sys.stderr)
        return 1
    print("anvil stopped; its state is saved")
    return 0


def deploy(args: argparse.Namespace) -> int:
    from eth_account import Account

    from teeshard.ledger.anvil import DEV_KEY
    from teeshard.ledger.evm import Chain
    from teeshard.ledger.evm.chain import key_from_env

    key = Account.from_key(DEV_KEY) if args.dev_key else key_from_env()
    chain = Chain.connect(args.rpc)
    address, block = chain.deploy(key, args.wei_per_token, args.reservation_timeout)
    print(f"ledger contract {address} (block {block}), owner {key.address}")
    print(f"ledger URL: evm+{args.rpc}?contract={address}&from_block={block}")
    return 0
