"""The EVM ledger backend: a Vyper contract (``TokenLedger.vy``) and its web3.py client.

``EvmLedger`` charges per request on chain; ``EpochSettler`` posts epoch roots
for the recommended path, where the SQL ledger charges and the chain settles.
"""

from teeshard.ledger.evm.chain import Chain
from teeshard.ledger.evm.client import EvmLedger
from teeshard.ledger.evm.settlement import EpochSettler

__all__ = ["Chain", "EpochSettler", "EvmLedger"]
