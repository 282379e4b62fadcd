"""The bridge between the SQL ledger and epoch settlement on chain (issue 9, item 7).

Deposits, withdrawals, registration and payouts are on chain; per-request
charging is off chain, in the SQL ledger. ``EpochBridge`` connects the two, as
the SQL ledger's owner and with a key the contract authorised as settler:

1. ``sync_escrow`` reads the contract's ``Escrowed`` events since the last block
   it processed (kept in the SQL ledger, per contract) and credits each deposit
   to the account named by the depositor's checksummed address, under the
   reference ``escrow:<tx hash>:<log index>``, which the ledger credits once
   (a rescan or a second bridge credits nothing).
2. ``settle_epoch`` syncs, distributes the SQL pool, takes every wallet-address
   account's earnings (and the unspent balance of users who asked for a refund)
   out of the SQL ledger as one payout epoch, then posts the Merkle root of the
   cumulative amounts with ``EpochSettler.settle`` and records it as posted.

Crash safety: the SQL payout is one transaction, recorded under its epoch
number before anything is posted, and a new epoch is refused while the last one
is unposted; so a crash after the payout resumes by posting that same epoch.
What is posted is computed from the SQL ledger (the sum of all payouts per
account is the cumulative amount the tree promises), and the settler posts only
the difference from what it knows was posted (it adopts a root that already
landed), so a crash before, during or after the post neither loses nor doubles
a payout. Claims are built from the same record (``claim``), checked against
the root the SQL ledger recorded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from eth_utils import to_checksum_address

from teeshard.ledger.evm.client import EvmLedger
from teeshard.ledger.evm.settlement import (
    Epoch,
    EpochSettler,
    EscrowDeposit,
    build_epoch,
    claim,
    escrow_deposits,
)
from teeshard.ledger.interface import Distribution, LedgerError, UnknownAccount
from teeshard.ledger.sql.bridge import PayoutBatch
from teeshard.ledger.sql.store import SqlLedger
from teeshard.paths import data_dir


class BridgeError(LedgerError):
    """The SQL ledger and the chain disagree in a way the bridge must not paper over."""

    code = "bridge_error"


@dataclass(frozen=True)
class SyncResult:
    first: int  # blocks [first, last] were read
    last: int
    credited: tuple[EscrowDeposit, ...]  # newly credited
    already: int  # deposits seen again (credited before): nothing done


@dataclass(frozen=True)
class EpochResult:
    synced: SyncResult
    distribution: Distribution | None
    batch: PayoutBatch | None  # what left the SQL ledger (None: nothing came due)
    epoch: Epoch | None  # what is posted on chain


def reference(deposit: EscrowDeposit) -> str:
    """The unique id an escrow deposit is credited under."""
    return f"escrow:{deposit.tx_hash}:{deposit.log_index}"


def cumulative(batches: list[PayoutBatch], through: int) -> dict[str, int]:
    """Per checksummed address, everything paid out in epochs ``<= through`` (pure)."""
    out: dict[str, int] = {}
    for batch in batches:
        if batch.epoch <= through:
            for account, tokens in batch.amounts.items():
                address = str(to_checksum_address(account))
                out[address] = out.get(address, 0) + tokens
    return out


def still_due(posted: Mapping[str, int], owed: Mapping[str, int]) -> dict[str, int]:
    """What the settler must add to ``posted`` to reach ``owed`` (pure); never negative."""
    ahead = {a: n for a, n in posted.items() if n > owed.get(a, 0)}
    if ahead:
        raise BridgeError(
            f"the settler's posted epochs promise more than the SQL ledger paid out "
            f"({sorted(ahead)}): restore the ledger, or the settler's epoch store, to match"
        )
    return {a: n - posted.get(a, 0) for a, n in owed.items() if n > posted.get(a, 0)}


def default_store(contract: str) -> Path:
    return data_dir() / "epochs" / str(to_checksum_address(contract))


class EpochBridge:
    """Runs epochs for ``sql`` (opened as its owner) on ``chain`` (opened with a settler key)."""

    def __init__(
        self,
        sql: SqlLedger,
        chain: EvmLedger,
        store: Path | None = None,
        *,
        confirmations: int = 0,
    ) -> None:
        self.sql = sql
        self.chain = chain
        self.contract = str(chain.address)
        self.confirmations = max(0, confirmations)
        self.settler = EpochSettler(chain, store)
        bound = sql.bridge_state("contract")
        if bound is None:
            sql.set_bridge_state("contract", self.contract)
        elif bound != self.contract:
            raise BridgeError(f"this SQL ledger settles on contract {bound}, not {self.contract}")

    def sync_escrow(self) -> SyncResult:
        """Credit every escrow deposit of the blocks not processed yet; record the last."""
        done = self.sql.bridge_state(f"escrow_block:{self.contract}")
        first = int(done) + 1 if done is not None else self.chain.from_block
        last = int(self.chain.w3.eth.block_number) - self.confirmations
        if last < first:
            return SyncResult(first, last, (), 0)
        credited, already = [], 0
        for deposit in escrow_deposits(self.chain, first, last):
            account = str(to_checksum_address(deposit.account))
            entry = self.sql.credit_escrow(
                account, deposit.tokens, reference(deposit), deposit.block
            )
            if entry is None:
                already += 1
            else:
                credited.append(deposit)
        self.sql.set_bridge_state(f"escrow_block:{self.contract}", str(last))
        return SyncResult(first, last, tuple(credited), already)

    def settle_epoch(self, *, distribute: bool = True) -> EpochResult:
        """Sync, distribute, pay out and post one epoch (or finish the one a crash left)."""
        synced = self.sync_escrow()
        batches = self.sql.payout_batches()
        if batches and batches[-1].posted_number is None:
            return EpochResult(synced, None, batches[-1], self._post(batches[-1]))
        distribution = self.sql.distribute() if distribute else None
        backed = int(self.chain._call("escrow_deposited"))
        number = batches[-1].epoch + 1 if batches else 0
        batch = self.sql.pay_out_epoch(number, self.contract, backed)
        if batch.total == 0:
            return EpochResult(synced, distribution, None, None)
        return EpochResult(synced, distribution, batch, self._post(batch))

    def _post(self, batch: PayoutBatch) -> Epoch:
        owed = cumulative(self.sql.payout_batches(), batch.epoch)
        epoch = self.settler.settle(still_due(self.settler.cumulative(), owed))
        if dict(epoch.amounts) != owed or epoch.number is None:
            raise BridgeError(f"epoch {epoch.number} on chain does not pay what SQL paid out")
        self.sql.mark_posted(batch.epoch, epoch.number, "0x" + epoch.root.hex())
        return epoch

    def posted(self, number: int | None = None) -> Epoch:
        """A posted epoch (default the latest), rebuilt from the SQL ledger's payouts."""
        batches = [b for b in self.sql.payout_batches() if b.posted_number is not None]
        if number is not None:
            batches = [b for b in batches if b.posted_number == number]
        if not batches:
            raise UnknownAccount("no settlement epoch was posted yet")
        last = batches[-1]
        assert last.posted_number is not None
        epoch = build_epoch(
            self.contract, cumulative(self.sql.payout_batches(), last.epoch), last.posted_number
        )
        if "0x" + epoch.root.hex() != last.root:
            raise BridgeError(f"the SQL ledger's payouts do not hash to epoch {number}'s root")
        return epoch

    def claim(self, account: str, number: int | None = None) -> int:
        """Claim ``account``'s cumulative amount on chain (any key may send it)."""
        return claim(self.chain, self.posted(number).claim(account))
