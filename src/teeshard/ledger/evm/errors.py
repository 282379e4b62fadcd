"""Contract reverts as ledger errors: the contract's short reason codes, mapped to the tree.

The contract reverts with a code (``insufficient_balance``); the client knows
the context and supplies the message a person reads. The settlement errors
(``InvalidProof``, ``UnknownEpoch``) and ``TooEarly`` exist only on chain, so
they live here, under ``LedgerError``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from teeshard.ledger.interface import (
    BackendError,
    DuplicateKey,
    DuplicateNode,
    DuplicateRequest,
    InsufficientBalance,
    InsufficientEarnings,
    InvalidAmount,
    LedgerError,
    ManifestMismatch,
    ReservationClosed,
    Unauthorized,
    UnknownAccount,
    UnknownNode,
    UnknownRequest,
)

Messages = Mapping[str, str | Callable[[], str]]


class InvalidProof(LedgerError):
    """A settlement claim whose Merkle proof does not lead to the epoch's root."""

    code = "invalid_proof"


class UnknownEpoch(LedgerError):
    code = "unknown_epoch"


class TooEarly(LedgerError):
    """Eviction of a node whose admission time has not run out (or that is admitted)."""

    code = "too_early"


_ERRORS: dict[str, type[LedgerError]] = {
    "invalid_amount": InvalidAmount,
    "unknown_account": UnknownAccount,
    "unknown_node": UnknownNode,
    "unknown_request": UnknownRequest,
    "unauthorized": Unauthorized,
    "insufficient_balance": InsufficientBalance,
    "insufficient_earnings": InsufficientEarnings,
    "duplicate_request": DuplicateRequest,
    "reservation_closed": ReservationClosed,
    "duplicate_node": DuplicateNode,
    "duplicate_key": DuplicateKey,
    "manifest_mismatch": ManifestMismatch,
    "too_many_nodes": LedgerError,
    "invalid_bond": InvalidAmount,
    "invalid_proof": InvalidProof,
    "unknown_epoch": UnknownEpoch,
    "too_early": TooEarly,
    "node_admitted": TooEarly,
}
_REASON = re.compile(r"execution reverted:?\s*([a-z_]+)")


def revert_error(name: str, exc: Exception, messages: Messages | None) -> LedgerError:
    """The LedgerError for a failed call of contract function ``name``."""
    match = _REASON.search(str(exc))
    if match is None:
        return BackendError(f"{name} failed: {exc}")
    code = match.group(1)
    message = (messages or {}).get(code)
    text = message() if callable(message) else message
    return _ERRORS.get(code, LedgerError)(text or f"{name} refused by the ledger contract: {code}")
