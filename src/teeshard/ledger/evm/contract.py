"""What every part of the EVM client shares: the contract, the signing key, calls and sends.

``EvmLedger`` (client.py) is assembled from this base, the node pool
(pool.py) and the roles (roles.py), so each module keeps one concern.
"""

from __future__ import annotations

from typing import Any

from eth_account.signers.local import LocalAccount
from web3 import Web3

from teeshard.ledger.evm.chain import Chain
from teeshard.ledger.evm.errors import Messages
from teeshard.ledger.evm.transactions import call, transact
from teeshard.ledger.interface import Unauthorized, UnknownAccount

# The most blocks one eth_getLogs may span: public RPC providers refuse wider ranges
# (2,000 to 10,000 blocks is common), so every event scan reads pages of this size.
LOG_PAGE_BLOCKS = 2000


def chain_id_of(text: str) -> bytes:
    """The bytes32 a request or node id is known by on chain."""
    return bytes(Web3.keccak(text=text))


class ContractClient:
    def __init__(
        self,
        chain: Chain,
        address: str,
        key: LocalAccount,
        *,
        from_block: int = 0,
        log_page_blocks: int = LOG_PAGE_BLOCKS,
    ) -> None:
        self.chain = chain
        self.w3 = chain.w3
        self.contract = chain.contract(address)
        self.address = self.contract.address
        self.key = key
        self.from_block = from_block  # where event scans start (the deployment block)
        self.log_page_blocks = max(1, log_page_blocks)
        self._wei_per_token: int | None = None

    @property
    def actor(self) -> str:
        return str(self.key.address)

    def close(self) -> None:
        return None

    def _call(self, name: str, *args: Any) -> Any:
        return call(self.chain, self.contract, name, *args)

    def _transact(
        self, name: str, *args: Any, value: int = 0, messages: Messages | None = None
    ) -> Any:
        return transact(
            self.chain, self.contract, self.key, name, *args, value=value, messages=messages
        )

    @staticmethod
    def _address(account: str) -> str:
        if not Web3.is_address(account):
            raise UnknownAccount(
                f"{account!r} is not a wallet address (accounts on chain are addresses)"
            )
        return str(Web3.to_checksum_address(account))

    def _require_self(self, account: str, what: str) -> str:
        address = self._address(account)
        if address != self.actor:
            raise Unauthorized(f"on chain only {address} itself may {what} (sign with its key)")
        return address

    def wei_per_token(self) -> int:
        if self._wei_per_token is None:
            self._wei_per_token = int(self._call("wei_per_token"))
        return self._wei_per_token
