"""Two processes signing with one key (two replicas of an entry node) both get through.

Each process used to count nonces in its own memory, so the second one to send
with a nonce failed with "nonce too low" (or "already known"). Run on anvil:
the in-process chain cannot be shared between processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from ledger_harness import evm_world

from teeshard.ledger.evm import Chain, EvmLedger
from teeshard.ledger.evm.chain import new_key
from teeshard.ledger.evm.nonces import is_nonce_error

SENDS = 12

SENDER = textwrap.dedent(
    """
    import os, sys, time
    from eth_account import Account
    from teeshard.ledger.evm import Chain, EvmLedger
    rpc, contract, account, start, sends = sys.argv[1:6]
    ledger = EvmLedger(Chain.connect(rpc), contract, Account.from_key(os.environ["KEY"]))
    ledger.wei_per_token()
    while time.time() < float(start):
        time.sleep(0.005)
    for _ in range(int(sends)):
        ledger.deposit(account, 1)
    """
)


def test_nonce_errors_are_recognised() -> None:
    for text in ("nonce too low: next nonce 5, tx nonce 4", "already known", "Nonce too high"):
        assert is_nonce_error(ValueError({"code": -32003, "message": text}))
    assert not is_nonce_error(ValueError("execution reverted: unauthorized"))


def test_two_processes_sharing_a_signing_key_both_succeed(
    anvil_chain: Chain, anvil_rpc: str, tmp_path: Path
) -> None:
    world = evm_world("anvil", anvil_chain, anvil_rpc)
    shared = new_key()
    anvil_chain.fund(shared.address, 10**19)
    user, _ = world.new_account()
    start = str(time.time() + 3.0)  # both start sending at the same moment
    env = {
        **os.environ,
        "KEY": shared.key.hex(),
        "TEESHARD_HOME": str(tmp_path),  # the nonce lock files of this host
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    args = [sys.executable, "-c", SENDER, anvil_rpc, world.address, user, start, str(SENDS)]
    procs = [
        subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=180)[0].decode() for p in procs]
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-2000:]
    ledger = EvmLedger(anvil_chain, world.address, shared, from_block=world.block)
    assert ledger.balance(user).available == 2 * SENDS
    assert ledger.check().ok


def test_a_stale_nonce_from_another_sender_is_retried(anvil_chain: Chain, anvil_rpc: str) -> None:
    """Another host sent with the key meanwhile: the node refuses our nonce, we take the next."""
    world = evm_world("anvil", anvil_chain, anvil_rpc)
    shared = new_key()
    anvil_chain.fund(shared.address, 10**19)
    user, _ = world.new_account()
    ledger = EvmLedger(anvil_chain, world.address, shared)
    stale = anvil_chain.pending_count(shared.address)
    other = EvmLedger(Chain.connect(anvil_rpc), world.address, shared)
    other.deposit(user, 1)  # took nonce `stale`
    real = anvil_chain.pending_count
    calls = []

    def lagging(address: str) -> int:  # a load-balanced RPC whose backend lags once
        calls.append(address)
        return stale if len(calls) == 1 else real(address)

    anvil_chain.pending_count = lagging  # type: ignore[method-assign]
    try:
        ledger.deposit(user, 1)
    finally:
        del anvil_chain.pending_count
    assert len(calls) == 2
    assert ledger.balance(user).available == 2


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
