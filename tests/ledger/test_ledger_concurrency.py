"""Concurrent charges against one balance, and a process killed between reserve and settle."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from ledger_harness import World
from trust_kit import admitted

from teeshard.ledger.interface import InsufficientBalance

CHARGES = 50
PRICE = 20  # each charge reserves and costs this much
TOKENS = 7  # model tokens each charge credits to the serving node


def test_fifty_concurrent_charges_never_overdraw(world: World) -> None:
    admitted(world, "node-c", "c" * 64, "0:2")
    funds = PRICE * 25  # room for exactly 25 of the 50
    account, _ = world.new_account(funds=funds)
    entries = [world.entry] + [world.another_entry() for _ in range(2)]
    start = threading.Barrier(CHARGES)

    def charge(i: int) -> bool:
        ledger = entries[i % len(entries)]
        start.wait()  # all 50 at once
        try:
            world.reserve(ledger, f"conc-{i}", account, PRICE)
        except InsufficientBalance:
            return False
        ledger.settle(f"conc-{i}", PRICE, {"node-c": TOKENS})
        return True

    with ThreadPoolExecutor(CHARGES) as pool:
        results = list(pool.map(charge, range(CHARGES)))
    succeeded = sum(results)
    assert succeeded == 25, f"{succeeded} charges went through a balance with room for 25"
    balance = world.entry.balance(account)
    assert (balance.available, balance.reserved) == (0, 0)
    assert world.entry.pool() == funds  # every token accounted for
    (node,) = world.entry.nodes()
    assert node.served_tokens == 25 * TOKENS
    check = world.owner.check()
    assert check.ok, check.mismatches
    assert check.held == check.total_in == funds


_WORKER = """
import sys
from teeshard.ledger.factory import open_ledger
ledger = open_ledger(sys.argv[1])
ledger.reserve(sys.argv[2], sys.argv[3], int(sys.argv[4]), key_hash=sys.argv[5] or None)
print("reserved", flush=True)
sys.stdin.read()  # wait to be killed
"""


def test_killed_between_reserve_and_settle_loses_nothing(world: World) -> None:
    if not world.url:
        pytest.skip("the in-process chain cannot be shared with another process (see anvil)")
    account, _ = world.new_account(funds=1000)
    env = {**os.environ, **world.subprocess_env()}
    worker = subprocess.Popen(
        [sys.executable, "-c", _WORKER, world.url, "doomed", account, "400",
         world.key_hash(account) or ""],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
    )  # fmt: skip
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "reserved"
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    assert worker.returncode == -signal.SIGKILL
    assert world.entry.balance(account).reserved == 400  # held by the dead process
    restarted = world.restarted_entry()
    if world.sql:
        assert restarted.recover() == []  # its lease has not run out yet
    world.expire_leases()  # now it has: nobody renewed it
    assert restarted.recover() == ["doomed"]
    balance = restarted.balance(account)
    assert (balance.available, balance.reserved) == (1000, 0)
    assert world.owner.check().ok


def test_only_the_owner_recovers_other_entries_expired_reservations(sql: World) -> None:
    account, _ = sql.new_account(funds=100)
    sql.reserve(sql.entry, "old", account, 60)
    other = sql.another_entry()
    sql.expire_leases()
    assert other.recover() == []  # not its own
    assert sql.owner.recover(older_than_s=3600.0) == []  # not that old
    assert sql.owner.recover(older_than_s=0.0) == ["old"]
    assert sql.entry.balance(account).available == 100
