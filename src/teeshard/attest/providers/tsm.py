"""Linux configfs-tsm: quotes from a TDX or SEV-SNP guest kernel.

Protocol (Documentation/ABI/testing/configfs-tsm): make a report directory under
``/sys/kernel/config/tsm/report/``, write 64 bytes to ``inblob``, read ``outblob``
(a TDX quote, or an SEV-SNP report) and ``provider`` (``tdx_guest``/``sev_guest``).
``generation`` counts writes to the directory; it must not change between our write
and our read, or another writer raced us and the outblob may not be ours.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from teeshard.attest.errors import ProviderError, ProviderUnavailable
from teeshard.attest.evidence import Evidence
from teeshard.attest.providers.base import check_quoted_report_data, check_report_data

DEFAULT_ROOT = Path("/sys/kernel/config/tsm/report")
TEE_TYPES = {"tdx_guest": "tdx", "sev_guest": "sev-snp"}
_counter = itertools.count()


class TsmProvider:
    name = "tsm"

    def __init__(self, root: str | Path = DEFAULT_ROOT, entry_name: str | None = None) -> None:
        self.root = Path(root)
        self.entry_name = entry_name  # fixed name (tests); default: a fresh one per quote
        if not self.root.is_dir():
            raise ProviderUnavailable(f"tsm: {self.root} not found (no configfs-tsm)")

    @classmethod
    def detect(cls, root: str | Path = DEFAULT_ROOT) -> TsmProvider | None:
        return cls(root) if Path(root).is_dir() else None

    def quote(self, report_data: bytes) -> Evidence:
        check_report_data(report_data)
        entry = self.root / (self.entry_name or f"teeshard-{os.getpid()}-{next(_counter)}")
        try:
            entry.mkdir(exist_ok=self.entry_name is not None)
            try:
                (entry / "inblob").write_bytes(report_data)
                before = self._generation(entry)
                outblob = (entry / "outblob").read_bytes()
                if self._generation(entry) != before:
                    raise ProviderError("tsm: another writer changed the report while we read it")
                kind = (entry / "provider").read_text().strip()
            finally:
                if self.entry_name is None:
                    entry.rmdir()
        except OSError as exc:
            raise ProviderError(f"tsm: quote request failed: {exc}") from exc
        tee_type = TEE_TYPES.get(kind)
        if tee_type is None:
            raise ProviderError(f"tsm: unknown provider {kind!r}")
        if tee_type == "tdx":
            check_quoted_report_data(self.name, outblob, report_data)
        return Evidence(self.name, tee_type, outblob, report_data)

    @staticmethod
    def _generation(entry: Path) -> int:
        try:
            return int((entry / "generation").read_text().strip())
        except ValueError:
            raise ProviderError("tsm: unreadable generation counter") from None
