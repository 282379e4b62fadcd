"""Phala dstack: quotes from the guest agent through ``dstack-sdk``.

Two sockets exist in the field: the current guest agent (``/var/run/dstack.sock``,
RPC ``GetQuote``) and the legacy tappd (``/var/run/tappd.sock``, RPC
``Tappd.TdxQuote`` with ``hash_algorithm="raw"`` so report_data is used as is).
Both return a TDX quote and the JSON event log whose RTMR3 entries a verifier
replays (``verify/dstack_eventlog.py``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from teeshard.attest.errors import ProviderError, ProviderUnavailable
from teeshard.attest.evidence import Evidence
from teeshard.attest.providers.base import check_quoted_report_data, check_report_data

DSTACK_SOCKETS = (
    "/var/run/dstack.sock",
    "/run/dstack.sock",
    "/var/run/dstack/dstack.sock",
    "/run/dstack/dstack.sock",
)
TAPPD_SOCKETS = (
    "/var/run/tappd.sock",
    "/run/tappd.sock",
    "/var/run/dstack/tappd.sock",
    "/run/dstack/tappd.sock",
)


def find_socket(candidates: tuple[str, ...], root: Path = Path("/")) -> Path | None:
    for candidate in candidates:
        path = root / candidate.lstrip("/")
        if path.exists():
            return path
    return None


class DstackProvider:
    """Evidence from a dstack CVM. ``legacy=True`` speaks to tappd instead."""

    def __init__(self, socket_path: str | Path, *, legacy: bool = False, timeout: float = 30.0):
        self.socket_path = Path(socket_path)
        self.legacy = legacy
        self.timeout = timeout
        self.name = "dstack-tappd" if legacy else "dstack"
        if not self.socket_path.exists():
            raise ProviderUnavailable(f"{self.name}: no socket at {self.socket_path}")

    @classmethod
    def detect(cls, root: Path = Path("/")) -> DstackProvider | None:
        found = find_socket(DSTACK_SOCKETS, root)
        if found is not None:
            return cls(found)
        found = find_socket(TAPPD_SOCKETS, root)
        return cls(found, legacy=True) if found is not None else None

    def quote(self, report_data: bytes) -> Evidence:
        check_report_data(report_data)
        try:
            response = self._request(report_data)
            quote = response.decode_quote()
        except ProviderError:
            raise
        except Exception as exc:  # httpx, pydantic and JSON errors from the SDK
            raise ProviderError(f"{self.name}: quote request failed: {exc}") from exc
        check_quoted_report_data(self.name, quote, report_data)
        return Evidence(self.name, "tdx", quote, report_data, response.event_log or None)

    def _request(self, report_data: bytes):  # type: ignore[no-untyped-def]
        from dstack_sdk import DstackClient, TappdClient

        if not self.legacy:
            return DstackClient(str(self.socket_path), timeout=self.timeout).get_quote(report_data)
        with warnings.catch_warnings():
            # The SDK marks tappd deprecated; still the only interface on older images.
            warnings.simplefilter("ignore", DeprecationWarning)
            client = TappdClient(str(self.socket_path), timeout=self.timeout)
            return client.tdx_quote(report_data, hash_algorithm="raw")
