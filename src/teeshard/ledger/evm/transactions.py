"""Calling and transacting with the ledger contract; reverts become LedgerErrors.

Every transaction is first estimated (a revert surfaces with its reason before
anything is sent), then signed locally and sent; a revert that only happens on
chain (another transaction got in first) is re-run as a call to learn why.
A send refused for its nonce (another process signing with the same key got
there first) is retried with a fresh one (``nonces``). The in-process chain is
not thread-safe, so it is used under the chain's lock.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from eth_account.signers.local import LocalAccount

from teeshard.ledger.evm.chain import RECEIPT_TIMEOUT_S, Chain
from teeshard.ledger.evm.errors import Messages, revert_error
from teeshard.ledger.evm.nonces import NONCE_RETRIES, is_nonce_error
from teeshard.ledger.interface import BackendError, LedgerError


@contextlib.contextmanager
def guard(chain: Chain) -> Iterator[None]:
    if chain.in_process:
        with chain.lock:
            yield
    else:
        yield


def call(chain: Chain, contract: Any, name: str, *args: Any) -> Any:
    """Read ``name(*args)`` from the contract."""
    with guard(chain):
        try:
            return getattr(contract.functions, name)(*args).call()
        except LedgerError:
            raise
        except Exception as exc:
            raise BackendError(f"reading {name} from the ledger contract failed: {exc}") from exc


def transact(
    chain: Chain,
    contract: Any,
    key: LocalAccount,
    name: str,
    *args: Any,
    value: int = 0,
    messages: Messages | None = None,
) -> Any:
    """Send one transaction; its receipt, or the revert mapped to a LedgerError."""
    w3 = chain.w3
    fn = getattr(contract.functions, name)(*args)
    sender = key.address
    with guard(chain):
        try:
            gas = fn.estimate_gas({"from": sender, "value": value})
        except Exception as exc:
            raise revert_error(name, exc, messages) from None
    for attempt in range(NONCE_RETRIES + 1):
        try:
            with chain.nonce_for(sender) as nonce:
                tx = fn.build_transaction(
                    {"from": sender, "value": value, "gas": gas + gas // 5, "nonce": nonce.value}
                )
                signed = key.sign_transaction(tx)
                tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
                if chain.in_process:
                    receipt = w3.eth.wait_for_transaction_receipt(tx_hash)
            break
        except Exception as exc:
            if is_nonce_error(exc) and attempt < NONCE_RETRIES:
                continue  # another process sent with this key first: take the next nonce
            raise BackendError(f"sending {name} failed: {exc}") from exc
    if not chain.in_process:
        receipt = w3.eth.wait_for_transaction_receipt(
            tx_hash, timeout=RECEIPT_TIMEOUT_S, poll_latency=0.02
        )
    if receipt["status"] != 1:
        # Reverted on chain after a clean estimate: re-run it to learn why.
        try:
            with guard(chain):
                fn.call({"from": sender, "value": value})
        except Exception as exc:
            raise revert_error(name, exc, messages) from None
        raise BackendError(f"{name} reverted on chain (transaction {tx_hash.hex()})")
    return receipt
