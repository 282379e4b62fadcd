"""Verification: quotes (dcap-qvl), policies, dstack event logs and whole bundles."""

from teeshard.attest.verify.bundle import VerifiedNode, check_report, verify_bundle
from teeshard.attest.verify.policy import ManifestExpectation, Policy
from teeshard.attest.verify.quote import (
    CollateralFile,
    CollateralSource,
    PccsCollateral,
    QuoteReport,
    collateral_source,
    load_collateral,
    read_quote_file,
    verify_quote,
)

__all__ = [
    "CollateralFile",
    "CollateralSource",
    "ManifestExpectation",
    "PccsCollateral",
    "Policy",
    "QuoteReport",
    "VerifiedNode",
    "check_report",
    "collateral_source",
    "load_collateral",
    "read_quote_file",
    "verify_bundle",
    "verify_quote",
]
