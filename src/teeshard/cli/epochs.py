"""The bridge commands: escrow into the SQL ledger, epochs out to the chain, claims.

``teeshard ledger sync-escrow``, ``teeshard ledger request-refund``,
``teeshard pool settle-epoch`` and ``teeshard pool claim`` (registered by
``cli.ledger`` and ``cli.pool``). ``--ledger``/``--actor`` name the SQL ledger
(its owner); ``--chain`` the contract (``evm+http://HOST:PORT?contract=0x...``,
signing with ``$TEESHARD_EVM_KEY``: a settler's key for settle-epoch, any key
for claim).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from teeshard.cli.ledger import ledger_command
from teeshard.ledger.interface import Ledger, LedgerError, NotSupported

if TYPE_CHECKING:
    from teeshard.ledger.epochs import EpochBridge
    from teeshard.ledger.evm import EvmLedger


def add_chain_options(parser: argparse.ArgumentParser, *, store: bool = True) -> None:
    parser.add_argument(
        "--chain",
        required=True,
        help="the contract: evm+http(s)://HOST:PORT?contract=0x...&from_block=N "
        "(key: $TEESHARD_EVM_KEY)",
    )
    if store:
        parser.add_argument(
            "--epochs",
            type=Path,
            default=None,
            help="directory of posted epochs' JSON (default $TEESHARD_HOME/epochs/CONTRACT)",
        )


def _chain(url: str) -> EvmLedger:
    from teeshard.ledger.evm import EvmLedger
    from teeshard.ledger.factory import open_ledger

    chain = open_ledger(url)
    if not isinstance(chain, EvmLedger):
        raise ValueError(f"--chain must be an evm+http(s):// URL, got {url!r}")
    return chain


def _bridge(args: argparse.Namespace, ledger: Ledger) -> EpochBridge:
    from teeshard.cli.ledger import _sql
    from teeshard.ledger.epochs import EpochBridge, default_store

    sql = _sql(ledger, "the bridge to the chain")
    chain = _chain(args.chain)
    store = getattr(args, "epochs", None) or default_store(chain.address)
    return EpochBridge(sql, chain, store, confirmations=getattr(args, "confirmations", 0))


@ledger_command
def sync_escrow(args: argparse.Namespace, ledger: Ledger) -> int:
    result = _bridge(args, ledger).sync_escrow()
    print(f"blocks {result.first}..{result.last}: credited {len(result.credited)} escrow "
          f"deposits, {result.already} already credited")  # fmt: skip
    for d in result.credited:
        print(f"  {d.account}: +{d.tokens} (escrow:{d.tx_hash}:{d.log_index})")
    return 0


@ledger_command
def request_refund(args: argparse.Namespace, ledger: Ledger) -> int:
    from teeshard.ledger.remote import RemoteLedger
    from teeshard.ledger.sql import SqlLedger

    account = args.account or ledger.actor
    if not isinstance(ledger, SqlLedger | RemoteLedger):
        raise NotSupported("on chain, refund unspent tokens with EvmLedger.refund")
    ledger.request_refund(account)
    print(f"{account}'s unspent tokens are paid back on chain at the next settlement epoch")
    return 0


@ledger_command
def settle_epoch(args: argparse.Namespace, ledger: Ledger) -> int:
    bridge = _bridge(args, ledger)
    result = bridge.settle_epoch(distribute=not args.no_distribute)
    print(f"escrow: credited {len(result.synced.credited)} deposits "
          f"(blocks {result.synced.first}..{result.synced.last})")  # fmt: skip
    if result.distribution is not None:
        print(f"distributed {result.distribution.distributed} of the pool "
              f"(treasury {result.distribution.treasury})")  # fmt: skip
    if result.batch is None or result.epoch is None:
        print("nothing came due: no epoch posted")
        return 0
    batch, epoch = result.batch, result.epoch
    print(f"paid out {batch.total} in payout epoch {batch.epoch}; posted as epoch "
          f"{epoch.number}, root 0x{epoch.root.hex()}, cumulative total {epoch.total}")  # fmt: skip
    for account, tokens in sorted(batch.earnings.items()):
        print(f"  {account}: earnings {tokens}")
    for account, tokens in sorted(batch.refunds.items()):
        print(f"  {account}: refund {tokens}")
    return 0


def claim(args: argparse.Namespace) -> int:
    """Claim from the settler's published epochs (``--epochs``), else from the SQL ledger."""
    if args.epochs is None:
        return _claim_from_ledger(args)
    try:
        return _claim(args, None)
    except LedgerError as exc:
        print(f"teeshard: error: {exc.code}: {exc}", file=sys.stderr)
        return 1


@ledger_command
def _claim_from_ledger(args: argparse.Namespace, ledger: Ledger) -> int:
    return _claim(args, ledger)


def _claim(args: argparse.Namespace, ledger: Ledger | None) -> int:
    from teeshard.ledger.evm.settlement import EpochSettler

    chain = _chain(args.chain)
    if ledger is None:  # the settler's published epochs: no ledger access needed
        paid = EpochSettler(chain, args.epochs).claim(args.account, args.number)
    else:
        paid = _bridge(args, ledger).claim(args.account, args.number)
    print(f"claimed {paid} tokens for {args.account}")
    if args.withdraw:
        if chain.actor.lower() != args.account.lower():
            raise NotSupported(f"--withdraw needs {args.account}'s own key in $TEESHARD_EVM_KEY")
        entry = chain.withdraw()
        print(f"withdrew {-entry.earnings} tokens in ETH to {chain.actor}")
    return 0
