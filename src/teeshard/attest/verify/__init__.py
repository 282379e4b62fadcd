"""Verification: quotes (dcap-qvl), policies, dstack event logs and whole bundles."""

from teeshard.attest.verify.bundle import VerifiedNode, evidence_kind, verify_bundle
from teeshard.attest.verify.measurements import check_report
from teeshard.attest.verify.policy import ManifestExpectation, Policy
from teeshard.attest.verify.quote import (
    DEFAULT_PCCS_URL,
    CollateralFile,
    CollateralSource,
    PccsCollateral,
    QuoteReport,
    collateral_source,
    load_collateral,
    quote_tee_type,
    read_quote_file,
    verify_quote,
)

__all__ = [
    "DEFAULT_PCCS_URL",
    "CollateralFile",
    "CollateralSource",
    "ManifestExpectation",
    "PccsCollateral",
    "Policy",
    "QuoteReport",
    "VerifiedNode",
    "check_report",
    "collateral_source",
    "evidence_kind",
    "load_collateral",
    "quote_tee_type",
    "read_quote_file",
    "verify_bundle",
    "verify_quote",
]
