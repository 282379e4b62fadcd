"""Connecting to a chain: in-process (eth-tester / py-evm), anvil, or any JSON-RPC URL.

Keys: a wallet's private key comes from the environment (``TEESHARD_EVM_KEY``
by default), never from the command line, and is never logged.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.types import Wei

from teeshard.ledger.evm.compile import compiled
from teeshard.ledger.evm.nonces import NonceLease
from teeshard.ledger.interface import BackendError

KEY_ENV = "TEESHARD_EVM_KEY"
DEFAULT_WEI_PER_TOKEN = 10**9  # 1 gwei per token
DEFAULT_RESERVATION_TIMEOUT_S = 3600
DEFAULT_REGISTRATION_BOND = 1000  # tokens (1 microether at 1 gwei per token)
DEFAULT_ADMISSION_TIMEOUT_S = 86400  # an unadmitted node may be evicted after a day
RECEIPT_TIMEOUT_S = 180.0


@dataclass
class Chain:
    w3: Web3
    in_process: bool = False
    # eth-tester is not thread-safe: every call on an in-process chain takes this lock.
    lock: threading.RLock = field(default_factory=threading.RLock)

    @classmethod
    def tester(cls) -> Chain:
        from eth_tester import EthereumTester
        from web3.providers.eth_tester import EthereumTesterProvider

        return cls(Web3(EthereumTesterProvider(EthereumTester())), in_process=True)

    @classmethod
    def connect(cls, rpc_url: str, timeout_s: float = 30.0) -> Chain:
        # cache_allowed_requests: eth_chainId and the like are asked once, not per call.
        provider = Web3.HTTPProvider(
            rpc_url, request_kwargs={"timeout": timeout_s}, cache_allowed_requests=True
        )
        w3 = Web3(provider)
        try:
            w3.eth.chain_id  # noqa: B018 - fail here, clearly, when nothing answers
        except Exception as exc:
            raise BackendError(f"no EVM JSON-RPC node answers at {rpc_url}: {exc}") from exc
        return cls(w3)

    def fund(self, address: str, wei: int) -> None:
        """Send ETH from the node's first unlocked account (dev chains only)."""
        with self.lock:
            source = self.w3.eth.accounts[0]
            tx = self.w3.eth.send_transaction({"from": source, "to": address, "value": Wei(wei)})
            self.w3.eth.wait_for_transaction_receipt(tx, timeout=RECEIPT_TIMEOUT_S)

    def deploy(
        self,
        deployer: LocalAccount,
        wei_per_token: int = DEFAULT_WEI_PER_TOKEN,
        reservation_timeout_s: int = DEFAULT_RESERVATION_TIMEOUT_S,
        *,
        registration_bond: int = DEFAULT_REGISTRATION_BOND,
        admission_timeout_s: int = DEFAULT_ADMISSION_TIMEOUT_S,
    ) -> tuple[str, int]:
        """Deploy a fresh ledger owned by ``deployer``: (address, block number)."""
        contract = compiled()
        factory = self.w3.eth.contract(abi=contract.abi, bytecode=contract.bytecode)
        constructor = factory.constructor(
            wei_per_token, reservation_timeout_s, registration_bond, admission_timeout_s
        )
        with self.nonce_for(deployer.address) as nonce:
            tx = constructor.build_transaction({"from": deployer.address, "nonce": nonce.value})
            signed = deployer.sign_transaction(tx)
            tx_hash = self.w3.eth.send_raw_transaction(signed.raw_transaction)
        receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=RECEIPT_TIMEOUT_S)
        if receipt["status"] != 1 or not receipt["contractAddress"]:
            raise BackendError("deploying the ledger contract failed")
        return str(receipt["contractAddress"]), int(receipt["blockNumber"])

    def nonce_for(self, address: str) -> NonceLease:
        """Hold the next nonce of ``address`` until the transaction is sent (see ``nonces``)."""
        return NonceLease(self, address)

    def pending_count(self, address: str) -> int:
        return int(self.w3.eth.get_transaction_count(Web3.to_checksum_address(address), "pending"))

    def contract(self, address: str) -> Any:
        return self.w3.eth.contract(address=Web3.to_checksum_address(address), abi=compiled().abi)


def key_from_env(env: str = KEY_ENV) -> LocalAccount:
    value = os.environ.get(env, "").strip()
    if not value:
        raise ValueError(
            f"set {env} to the hex private key of the wallet that signs ledger transactions"
        )
    try:
        return Account.from_key(value)
    except (ValueError, TypeError):
        raise ValueError(f"{env} does not hold a valid private key (64 hex digits)") from None


def new_key() -> LocalAccount:
    return Account.create()
