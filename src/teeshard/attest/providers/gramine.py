"""Gramine SGX: quotes through the ``/dev/attestation`` pseudo-files.

Inside a Gramine enclave with ``sgx.remote_attestation = "dcap"``: write 64 bytes
to ``user_report_data``, then read a DCAP quote from ``quote``. The root is a
parameter so tests can point it at a fake directory.
"""

from __future__ import annotations

from pathlib import Path

from teeshard.attest.errors import ProviderError, ProviderUnavailable
from teeshard.attest.evidence import Evidence
from teeshard.attest.providers.base import check_quoted_report_data, check_report_data

DEFAULT_ROOT = Path("/dev/attestation")


class GramineProvider:
    name = "gramine"

    def __init__(self, root: str | Path = DEFAULT_ROOT) -> None:
        self.root = Path(root)
        type_file = self.root / "attestation_type"
        if not type_file.is_file():
            raise ProviderUnavailable(f"gramine: {type_file} not found (not inside Gramine SGX)")
        kind = type_file.read_text().strip()
        if kind != "dcap":
            raise ProviderUnavailable(
                f'gramine: attestation type is {kind!r}; set sgx.remote_attestation = "dcap"'
            )

    @classmethod
    def detect(cls, root: str | Path = DEFAULT_ROOT) -> GramineProvider | None:
        return cls(root) if (Path(root) / "quote").exists() else None

    def quote(self, report_data: bytes) -> Evidence:
        check_report_data(report_data)
        try:
            with open(self.root / "user_report_data", "wb", buffering=0) as handle:
                handle.write(report_data)
            quote = (self.root / "quote").read_bytes()
        except OSError as exc:
            raise ProviderError(f"gramine: quote request failed: {exc}") from exc
        check_quoted_report_data(self.name, quote, report_data)
        return Evidence(self.name, "sgx", quote, report_data)
