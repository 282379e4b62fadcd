"""Token ledger and contribution pool: SQL (default) and EVM backends behind one protocol.

``open_ledger(url, actor=...)`` opens any backend (see ``teeshard.ledger.factory``);
``LedgerBilling`` charges requests through one; ``Pricing`` prices them. The error
tree is drawn in ``teeshard.ledger.interface`` (``LedgerError`` and its
subclasses) and ``teeshard.ledger.billing`` (``BillingError``).
"""

from teeshard.ledger.billing import (
    BillingError,
    ChargeRequest,
    InvalidKey,
    LedgerBilling,
    LedgerUnavailable,
    MissingKey,
    PaymentRequired,
    PricingFailed,
    Reservation,
    Settlement,
    billing_from_url,
)
from teeshard.ledger.factory import open_ledger
from teeshard.ledger.interface import (
    BackendError,
    Balance,
    DuplicateKey,
    DuplicateNode,
    DuplicateRequest,
    InsufficientBalance,
    InsufficientEarnings,
    InvalidAmount,
    Ledger,
    LedgerError,
    ManifestMismatch,
    NodeInfo,
    NodeRecord,
    ReservationClosed,
    Unauthorized,
    UnknownAccount,
    UnknownNode,
    UnknownRequest,
)
from teeshard.ledger.pricing import Pricing, PricingError

__all__ = [
    "BackendError",
    "Balance",
    "BillingError",
    "ChargeRequest",
    "DuplicateKey",
    "DuplicateNode",
    "DuplicateRequest",
    "InsufficientBalance",
    "InsufficientEarnings",
    "InvalidAmount",
    "InvalidKey",
    "Ledger",
    "LedgerBilling",
    "LedgerError",
    "LedgerUnavailable",
    "ManifestMismatch",
    "MissingKey",
    "NodeInfo",
    "NodeRecord",
    "PaymentRequired",
    "Pricing",
    "PricingError",
    "PricingFailed",
    "Reservation",
    "ReservationClosed",
    "Settlement",
    "Unauthorized",
    "UnknownAccount",
    "UnknownNode",
    "UnknownRequest",
    "billing_from_url",
    "open_ledger",
]
