"""The provider interface: evidence from a TEE, bound to 64 bytes of report_data."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from teeshard.attest.errors import ProviderError
from teeshard.attest.evidence import REPORT_DATA_SIZE, Evidence


@runtime_checkable
class Provider(Protocol):
    """A source of attestation evidence.

    ``name`` is what the start-up log and the bundle show ("dstack", "dstack-tappd",
    "gramine", "tsm", "simulated"). ``quote`` returns evidence whose report_data is
    exactly the 64 bytes given.
    """

    name: str

    def quote(self, report_data: bytes) -> Evidence: ...


def check_report_data(report_data: bytes) -> bytes:
    if len(report_data) != REPORT_DATA_SIZE:
        raise ProviderError(f"report_data must be {REPORT_DATA_SIZE} bytes, got {len(report_data)}")
    return report_data


def check_quoted_report_data(provider: str, quote: bytes, report_data: bytes) -> None:
    """Refuse a quote whose report_data is not what was asked for.

    Why: an agent that hashes or pads report_data (tappd's non-raw modes) would give
    evidence that never verifies; better to fail at start-up with the reason.
    """
    import dcap_qvl

    try:
        quoted = bytes(dcap_qvl.parse_quote(quote).report.report_data)
    except ValueError as exc:
        raise ProviderError(f"{provider}: returned an unparseable quote: {exc}") from None
    if quoted != report_data:
        raise ProviderError(f"{provider}: the quote's report_data is not the one requested")
