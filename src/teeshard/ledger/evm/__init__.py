"""The EVM ledger backend: a Vyper contract (``TokenLedger.vy``) and its web3.py client."""

from teeshard.ledger.evm.chain import Chain
from teeshard.ledger.evm.client import EvmLedger

__all__ = ["Chain", "EvmLedger"]
