"""What the test_chain_* tests do to a chain: move its clock, cap its log queries, force wei in.

All of it acts on the real chain (eth-tester in process, or anvil over JSON-RPC):
- ``advance`` moves block time forward (eth-tester ``time_travel``; anvil
  ``evm_increaseTime`` then ``evm_mine``);
- ``RangeCap`` makes the chain's client refuse ``eth_getLogs`` over more than
  N blocks, as public RPC providers do (a web3 middleware; nothing else
  changes), and records the ranges asked for;
- ``force_send`` deploys ``contracts/ForceSend.vy`` with some wei and
  self-destructs it into a target (no contract can refuse that payment).
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import pytest
import vyper
from ledger_harness import EvmWorld, evm_world
from vyper.compiler.settings import Settings
from web3.middleware import Web3Middleware

from teeshard.ledger.evm import Chain

CONTRACTS = Path(__file__).with_name("contracts")


def chain_world(request: pytest.FixtureRequest) -> EvmWorld:
    if request.param == "evm":
        return evm_world("evm", Chain.tester())
    chain = request.getfixturevalue("anvil_chain")
    return evm_world("anvil", chain, request.getfixturevalue("anvil_rpc"))


def advance(chain: Chain, seconds: int) -> None:
    w3 = chain.w3
    if chain.in_process:
        with chain.lock:
            now = int(w3.eth.get_block("latest")["timestamp"])
            w3.provider.ethereum_tester.time_travel(now + seconds)  # type: ignore[union-attr]
    else:
        w3.provider.make_request("evm_increaseTime", [seconds])  # type: ignore[arg-type]
        w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]


class RangeCap:
    """Refuse eth_getLogs spanning more than ``blocks`` blocks on this chain (a middleware)."""

    def __init__(self, chain: Chain, blocks: int) -> None:
        self.chain = chain
        self.blocks = blocks
        self.ranges: list[tuple[int, int]] = []
        cap = self

        class Cap(Web3Middleware):
            def request_processor(self, method: Any, params: Any) -> Any:
                if method == "eth_getLogs":
                    cap._check(params[0])
                return method, params

        chain.w3.middleware_onion.add(Cap, name="range-cap")

    def _block(self, value: Any) -> int:
        if value in (None, "latest", "pending", "safe", "finalized"):
            return int(self.chain.w3.eth.block_number)
        if value == "earliest":
            return 0
        return int(value, 16) if isinstance(value, str) else int(value)

    def _check(self, query: dict[str, Any]) -> None:
        first = self._block(query.get("fromBlock", "latest"))
        last = self._block(query.get("toBlock", "latest"))
        self.ranges.append((first, last))
        if last - first + 1 > self.blocks:
            raise ValueError(
                f"query exceeds max block range {self.blocks} ({first}..{last}); page it"
            )

    def remove(self) -> None:
        self.chain.w3.middleware_onion.remove("range-cap")


@functools.cache
def _compiled(name: str) -> tuple[list[Any], str]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*selfdestruct.*is deprecated")  # ForceSend
        out = vyper.compile_code(
            (CONTRACTS / f"{name}.vy").read_text(),
            output_formats=["abi", "bytecode"],
            settings=Settings(evm_version="cancun"),
        )
    return out["abi"], out["bytecode"]


def send(chain: Chain, fn: Any, value: int = 0) -> Any:
    """Send ``fn`` from the chain's first unlocked account; its receipt (it must succeed)."""
    with chain.lock:
        tx = fn.transact({"from": chain.w3.eth.accounts[0], "value": value, "gas": 29_000_000})
        receipt = chain.w3.eth.wait_for_transaction_receipt(tx)
    assert receipt["status"] == 1, receipt
    return receipt


def deploy_helper(chain: Chain, name: str, *args: Any, value: int = 0) -> Any:
    """Deploy ``contracts/NAME.vy`` from the chain's first unlocked account."""
    abi, bytecode = _compiled(name)
    factory = chain.w3.eth.contract(abi=abi, bytecode=bytecode)
    receipt = send(chain, factory.constructor(*args), value)
    return chain.w3.eth.contract(address=receipt["contractAddress"], abi=abi)


def force_send(chain: Chain, target: str, wei: int) -> None:
    helper = deploy_helper(chain, "ForceSend", value=wei)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="SELFDESTRUCT opcode")  # py-evm's notice
        send(chain, helper.functions.boom(target))
