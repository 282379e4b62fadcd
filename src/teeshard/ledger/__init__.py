"""Token ledger and contribution pool: SQL (default) and EVM backends behind one protocol.

``open_ledger(url, actor=...)`` opens any backend (see ``teeshard.ledger.factory``);
``LedgerBilling`` charges requests through one; ``Pricing`` prices them. The error
tree is drawn in ``teeshard.ledger.interface`` (``LedgerError`` and its
subclasses) and ``teeshard.ledger.billing`` (``BillingError``).
"""

from teeshard.ledger.billing import (
    BillingError,
    ChargeRequest,
    IdempotentReplay,
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
from teeshard.ledger.claims import AttestedNode, OperatorClaim, claim_response, sign_claim
from teeshard.ledger.factory import open_ledger
from teeshard.ledger.interface import (
    BackendError,
    Balance,
    ClaimRefused,
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
    NotSupported,
    ReservationClosed,
    SpendLimitExceeded,
    Unauthorized,
    UnknownAccount,
    UnknownNode,
    UnknownRequest,
    UnverifiedWork,
)
from teeshard.ledger.pricing import Pricing, PricingError

__all__ = [
    "AttestedNode",
    "BackendError",
    "Balance",
    "BillingError",
    "ChargeRequest",
    "ClaimRefused",
    "DuplicateKey",
    "DuplicateNode",
    "DuplicateRequest",
    "IdempotentReplay",
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
    "NotSupported",
    "OperatorClaim",
    "PaymentRequired",
    "Pricing",
    "PricingError",
    "PricingFailed",
    "Reservation",
    "ReservationClosed",
    "Settlement",
    "SpendLimitExceeded",
    "Unauthorized",
    "UnknownAccount",
    "UnknownNode",
    "UnknownRequest",
    "UnverifiedWork",
    "billing_from_url",
    "claim_response",
    "open_ledger",
    "sign_claim",
]
