"""``teeshard ledger``: accounts and balances (deposit, balance, history, keys, entries, audit).

Works against any backend named by ``--ledger URL`` (see ``teeshard.ledger.factory``):
direct SQL access acts as ``--actor`` (no default: say who you are), a ledger
service (``ledger+https://``) as the key in ``$TEESHARD_LEDGER_KEY``, EVM ledgers as
the key in ``$TEESHARD_EVM_KEY``. ``serve`` runs the service; ``add-actor`` makes
a key for a party (owner).
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from teeshard.ledger.factory import default_url
from teeshard.ledger.interface import Ledger, LedgerError, NotSupported

if TYPE_CHECKING:
    from teeshard.ledger.sql import SqlLedger

Command = Callable[[argparse.Namespace], int]


def add_ledger_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ledger",
        default=None,
        help=f"ledger URL: sqlite:///FILE, postgresql://..., ledger+https://HOST:PORT, "
        f"evm+http://HOST:PORT?contract=0x... (default $TEESHARD_LEDGER or {default_url()})",
    )
    parser.add_argument(
        "--actor",
        default=None,
        help="who acts on a database opened directly (default $TEESHARD_LEDGER_ACTOR; required); "
        "a ledger service's key ($TEESHARD_LEDGER_KEY) or the chain key ($TEESHARD_EVM_KEY) "
        "is the identity elsewhere",
    )


def open_from_args(args: argparse.Namespace) -> Ledger:
    from teeshard.ledger.factory import open_ledger

    return open_ledger(args.ledger, actor=args.actor)


def ledger_command(fn: Callable[[argparse.Namespace, Ledger], int]) -> Command:
    """Open the ledger, run, close; a ledger error is one clear line and exit status 1."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        from teeshard.ledger.registration import RegistrationRefused

        try:
            ledger = open_from_args(args)
        except (LedgerError, ValueError) as exc:
            print(f"teeshard: error: {exc}", file=sys.stderr)
            return 1
        try:
            return fn(args, ledger)
        except LedgerError as exc:
            print(f"teeshard: error: {exc.code}: {exc}", file=sys.stderr)
            return 1
        except RegistrationRefused as exc:
            print(f"teeshard: refused: {exc}", file=sys.stderr)
            return 1
        finally:
            ledger.close()

    return run


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("ledger", help="token accounts: deposit, balance, history")
    commands = parser.add_subparsers(dest="ledger_command", required=True, metavar="COMMAND")

    def sub(name: str, help: str, func: Command) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help)
        add_ledger_options(p)
        p.set_defaults(func=func)
        return p

    p = sub("deposit", "credit AMOUNT tokens to ACCOUNT (on chain: pay ETH for them)", deposit)
    p.add_argument("amount", type=int, help="tokens (integer)")
    p.add_argument("--account", default=None, help="account (default: the actor / your wallet)")
    p = sub("balance", "show an account's balances", balance)
    p.add_argument("--account", default=None, help="account (default: the actor / your wallet)")
    p = sub("history", "show an account's journal, newest first", history)
    p.add_argument("--account", default=None, help="account (default: the actor / your wallet)")
    p.add_argument("--limit", type=int, default=50, help="rows (default 50)")
    p = sub(
        "open-account", "open an account (SQL: owner only; on chain: your wallet)", open_account
    )
    p.add_argument("account", nargs="?", default=None)
    p = sub("new-key", "make an API key for an account; printed once, stored hashed", new_key)
    p.add_argument("--account", default=None, help="account (default: the actor / your wallet)")
    p = sub("authorize-entry", "let an entry node reserve and settle charges (owner)", authorize)
    p.add_argument("entry", help="entry node name (SQL) or address (EVM)")
    p.add_argument("--spend-limit", type=int, default=None, help="most it may charge per period")
    p.add_argument("--period", type=float, default=86400.0, help="the period, seconds (1 day)")
    p = sub("check", "recompute every balance from the journal; list stuck reservations", check)
    p.add_argument(
        "--stuck-after", type=float, default=3600.0,
        help="list reservations open longer than this as stuck money (s, default 3600)",
    )  # fmt: skip
    p = sub("recover", "release open reservations of expired leases", recover)
    p.add_argument("--older-than", type=float, default=None, help="only those older (s)")
    p = sub("add-actor", "make a ledger-service key for a party (owner; shown once)", add_actor)
    p.add_argument("name", help="the actor: an account, an operator or an entry node")
    p = sub("admission-epoch", "how long an admission lasts before re-attestation (owner)", epoch)
    p.add_argument("seconds", type=float)
    p = sub("serve", "serve this ledger to its parties over HTTP(S) (holds the DB)", serve)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8600)
    p.add_argument("--tls-cert", default=None, help="PEM certificate (serve HTTPS)")
    p.add_argument("--tls-key", default=None, help="its PEM private key")
    from teeshard.cli import epochs as bridge

    p = sub(
        "sync-escrow",
        "credit the contract's escrow deposits, each once (owner)",
        bridge.sync_escrow,
    )
    bridge.add_chain_options(p, store=False)
    p.add_argument("--confirmations", type=int, default=0, help="blocks to wait (default 0)")
    p = sub("request-refund", "pay an account's unspent tokens back at the next epoch",
            bridge.request_refund)  # fmt: skip
    p.add_argument("--account", default=None, help="its wallet address (default: the actor)")


def _account(args: argparse.Namespace, ledger: Ledger) -> str:
    return str(args.account or ledger.actor)


def _time(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S")


@ledger_command
def deposit(args: argparse.Namespace, ledger: Ledger) -> int:
    entry = ledger.deposit(_account(args, ledger), args.amount)
    print(f"deposited {entry.available} tokens to {entry.account}")
    print(f"available: {ledger.balance(entry.account).available}")
    return 0


@ledger_command
def balance(args: argparse.Namespace, ledger: Ledger) -> int:
    b = ledger.balance(_account(args, ledger))
    print(f"account:   {b.account}")
    print(f"available: {b.available}")
    print(f"reserved:  {b.reserved}")
    print(f"earnings:  {b.earnings}")
    return 0


@ledger_command
def history(args: argparse.Namespace, ledger: Ledger) -> int:
    account = _account(args, ledger)
    table = Table(title=f"journal of {account}")
    for column in ("seq", "time (UTC)", "kind", "available", "reserved", "earnings", "request"):
        table.add_column(
            column, justify="right" if column in ("available", "reserved", "earnings") else "left"
        )
    for e in ledger.history(account, args.limit):
        table.add_row(
            str(e.seq),
            _time(e.at),
            e.kind,
            f"{e.available:+d}",
            f"{e.reserved:+d}",
            f"{e.earnings:+d}",
            e.request_id or e.memo or "",
        )
    Console().print(table)
    return 0


@ledger_command
def open_account(args: argparse.Namespace, ledger: Ledger) -> int:
    account = args.account or ledger.actor
    ledger.open_account(account)
    print(f"account {account} is open")
    return 0


@ledger_command
def new_key(args: argparse.Namespace, ledger: Ledger) -> int:
    from teeshard.ledger.keys import new_api_key

    account = _account(args, ledger)
    key = new_api_key()
    ledger.add_api_key(account, key)
    print(f"API key for {account} (shown once; only its hash is stored):", file=sys.stderr)
    print(key)
    return 0


@ledger_command
def authorize(args: argparse.Namespace, ledger: Ledger) -> int:
    ledger.authorize_entry(args.entry, spend_limit=args.spend_limit, period_s=args.period)
    limit = f", at most {args.spend_limit} per {args.period:g} s" if args.spend_limit else ""
    print(f"{args.entry} may now reserve and settle charges{limit}")
    return 0


@ledger_command
def check(args: argparse.Namespace, ledger: Ledger) -> int:
    result = ledger.check()
    print(f"accounts checked: {result.accounts_checked}")
    print(f"deposits {result.total_in}, withdrawals {result.total_out}, held {result.held}")
    for line in result.mismatches:
        print(f"MISMATCH {line}")
    try:
        stuck = ledger.open_reservations(args.stuck_after)
    except NotSupported:
        stuck = []
    for r in stuck:
        print(f"STUCK {r.request_id}: {r.amount} of {r.account} held by {r.holder} since "
              f"{_time(r.created_at)} UTC")  # fmt: skip
    if stuck:
        print(f"{len(stuck)} reservations open longer than {args.stuck_after:g} s: stuck money "
              "(`teeshard ledger recover` releases those of expired leases)")  # fmt: skip
    print("consistent" if result.ok else "INCONSISTENT")
    return 0 if result.ok else 1


def _sql(ledger: Ledger, what: str) -> SqlLedger:
    from teeshard.ledger.sql import SqlLedger

    if not isinstance(ledger, SqlLedger):
        raise NotSupported(f"{what} works on an SQL ledger opened directly (by its owner)")
    return ledger


@ledger_command
def add_actor(args: argparse.Namespace, ledger: Ledger) -> int:
    key = _sql(ledger, "add-actor").add_actor_key(args.name)
    print(f"ledger-service key for {args.name} (shown once; only its hash is stored):",
          file=sys.stderr)  # fmt: skip
    print(key)
    return 0


@ledger_command
def epoch(args: argparse.Namespace, ledger: Ledger) -> int:
    _sql(ledger, "admission-epoch").set_admission_epoch(args.seconds)
    print(f"admissions now last {args.seconds:g} s unless the node is attested again")
    return 0


@ledger_command
def serve(args: argparse.Namespace, ledger: Ledger) -> int:
    import uvicorn

    from teeshard.ledger.service import create_app

    sql = _sql(ledger, "serve")
    if not sql.owner():
        raise NotSupported("this ledger has no owner yet: open it once as its owner (--actor)")
    scheme = "https" if args.tls_cert else "http"
    print(f"ledger service on {scheme}://{args.host}:{args.port} (ledger+{scheme}://...)",
          file=sys.stderr)  # fmt: skip
    uvicorn.run(
        create_app(sql.engines), host=args.host, port=args.port, log_level="warning",
        ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key,
    )  # fmt: skip
    return 0


@ledger_command
def recover(args: argparse.Namespace, ledger: Ledger) -> int:
    released = ledger.recover(args.older_than)
    print(f"released {len(released)} reservations")
    for request_id in released:
        print(f"  {request_id}")
    return 0
