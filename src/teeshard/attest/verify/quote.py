"""DCAP quote verification (TDX and SGX) with ``dcap-qvl``.

``dcap_qvl.verify`` checks the whole chain: the quote's ECDSA signature by the
attestation key, the QE report and its binding of that key, the PCK certificate
chain up to Intel's root CA, the CRLs, and the TCB info and QE identity signed by
Intel, all at the given time. It returns the TCB status and advisories; this
module maps that to a frozen :class:`QuoteReport` with the measurements a policy
checks. Collateral comes from a cached JSON file or a PCCS URL.

What kind of quote it is (TDX or SGX) is read from the quote's own header, never
from a label next to it. dcap-qvl does not expose an SGX enclave's ISVPRODID and
ISVSVN; they are read here from the report body the verified signature covers
(``sgx_report_body_t``: ISVPRODID at offset 256, ISVSVN at 258), after checking
that the body found there carries the same MRENCLAVE dcap-qvl reports.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import dcap_qvl

from teeshard.attest.errors import CollateralError, FormatError, QuoteError

Collateral = Any  # dcap_qvl.QuoteCollateralV3 (a compiled class without usable stubs)

# Any PCCS works (the collateral is signed by Intel): the default of the CLI and the node.
DEFAULT_PCCS_URL = "https://pccs.phala.network"

_QUOTE_HEADER_SIZE = 48
_SGX_BODY_SIZE = 384
_SGX_MRENCLAVE_AT = 64
_SGX_ISV_AT = 256  # u16 ISVPRODID, then u16 ISVSVN (little-endian)


@dataclass(frozen=True)
class QuoteReport:
    """What a verified quote says. Measurements are None where the TEE type lacks them."""

    tee_type: str  # "tdx" or "sgx"
    tcb_status: str  # e.g. "UpToDate", "SWHardeningNeeded", "OutOfDate"
    advisory_ids: tuple[str, ...]
    report_data: bytes
    debug: bool  # the TD or enclave runs in debug mode (memory readable by the host)
    mrtd: bytes | None = None
    rtmr0: bytes | None = None
    rtmr1: bytes | None = None
    rtmr2: bytes | None = None
    rtmr3: bytes | None = None
    mrconfigid: bytes | None = None  # TDX MRCONFIGID (48 bytes)
    td_attributes: bytes | None = None  # TDX TDATTRIBUTES (8 bytes, as in the quote)
    xfam: bytes | None = None  # TDX XFAM (8 bytes, as in the quote)
    mrenclave: bytes | None = None
    mrsigner: bytes | None = None
    isvprodid: int | None = None  # SGX ISVPRODID
    isvsvn: int | None = None  # SGX ISVSVN

    def measurements(self) -> dict[str, str]:
        names = (
            "mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mrconfigid", "td_attributes", "xfam",
            "mrenclave", "mrsigner",
        )  # fmt: skip
        shown = {n: v.hex() for n in names if (v := getattr(self, n)) is not None}
        shown |= {n: str(v) for n in ("isvprodid", "isvsvn") if (v := getattr(self, n)) is not None}
        return shown


def quote_tee_type(quote: bytes) -> str:
    """``"tdx"`` or ``"sgx"``, from the quote's own header; FormatError if it is neither."""
    try:
        parsed = dcap_qvl.parse_quote(quote)
    except ValueError as exc:
        raise FormatError(f"not a DCAP quote: {exc}") from None
    if parsed.is_tdx():
        return "tdx"
    if parsed.is_sgx():
        return "sgx"
    raise FormatError("quote is neither TDX nor SGX")


def sgx_isv(quote: bytes, mrenclave: bytes) -> tuple[int, int]:
    """(ISVPRODID, ISVSVN) of an SGX quote's report body (quote versions 3 to 5)."""
    (version,) = struct.unpack_from("<H", quote, 0)
    # v5 puts a body descriptor (u16 type, u32 size) between the header and the body
    body_at = _QUOTE_HEADER_SIZE + (6 if version >= 5 else 0)
    body = quote[body_at : body_at + _SGX_BODY_SIZE]
    if len(body) != _SGX_BODY_SIZE or body[_SGX_MRENCLAVE_AT : _SGX_MRENCLAVE_AT + 32] != mrenclave:
        raise QuoteError(f"cannot locate the SGX report body in a version {version} quote")
    isvprodid, isvsvn = struct.unpack_from("<HH", body, _SGX_ISV_AT)
    return isvprodid, isvsvn


class CollateralSource(Protocol):
    def get(self, quote: bytes) -> Collateral: ...


def load_collateral(path: str | Path) -> Collateral:
    """Collateral from a JSON file in dcap-qvl's format (``QuoteCollateralV3.to_json``)."""
    try:
        return dcap_qvl.QuoteCollateralV3.from_json(Path(path).read_text())
    except OSError as exc:
        raise CollateralError(f"cannot read collateral {path}: {exc}") from None
    except ValueError as exc:
        raise CollateralError(f"collateral {path} is malformed: {exc}") from None


@dataclass(frozen=True)
class CollateralFile:
    """A cached collateral file; valid until its TCB info's nextUpdate."""

    path: Path

    def get(self, quote: bytes) -> Collateral:
        return load_collateral(self.path)


Fetch = Callable[[str, bytes], Awaitable[Collateral]]


class PccsCollateral:
    """Collateral fetched from a PCCS (or Intel PCS) URL, cached per FMSPC for ``ttl_s``."""

    def __init__(self, url: str, ttl_s: float = 3600.0, fetch: Fetch | None = None) -> None:
        self.url = url
        self.ttl_s = ttl_s
        self._fetch: Fetch = fetch or dcap_qvl.get_collateral
        self._cache: dict[tuple[str, str, str], tuple[float, Collateral]] = {}

    def get(self, quote: bytes) -> Collateral:
        try:
            parsed = dcap_qvl.parse_quote(quote)
            key = (parsed.quote_type(), parsed.fmspc(), parsed.ca())
        except ValueError as exc:
            raise QuoteError(f"unparseable quote: {exc}") from None
        hit = self._cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < self.ttl_s:
            return hit[1]
        # get_collateral is a coroutine; run it on a private loop in a worker thread so
        # this works both from plain code and from inside a running event loop.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            try:
                coroutine = self._fetch(self.url, quote)
                collateral: Collateral = pool.submit(_run, coroutine).result()
            except Exception as exc:
                raise CollateralError(f"collateral fetch from {self.url} failed: {exc}") from exc
        self._cache[key] = (time.monotonic(), collateral)
        return collateral


def collateral_source(
    file: str | Path | None, pccs_url: str | None
) -> CollateralFile | PccsCollateral | None:
    """A cached collateral file if given, else the PCCS at ``pccs_url``, else none."""
    if file is not None:
        return CollateralFile(Path(file))
    if pccs_url:
        return PccsCollateral(pccs_url)
    return None


def _run(coroutine: Awaitable[Collateral]) -> Collateral:
    async def wait() -> Collateral:
        return await coroutine

    return asyncio.run(wait())


def read_quote_file(path: str | Path) -> bytes:
    """A quote file, raw binary or hex text."""
    data = Path(path).read_bytes()
    text = data.strip()
    if text and all(c in b"0123456789abcdefABCDEF" for c in text):
        return bytes.fromhex(text.decode())
    return data


def verify_quote(quote: bytes, collateral: Collateral | CollateralSource, now: int) -> QuoteReport:
    """Verify a TDX or SGX quote at unix time ``now``; raise QuoteError with dcap-qvl's reason."""
    if hasattr(collateral, "get") and not isinstance(collateral, dcap_qvl.QuoteCollateralV3):
        collateral = collateral.get(quote)
    try:
        verified = dcap_qvl.verify(quote, collateral, int(now))
    except ValueError as exc:
        raise QuoteError(f"quote rejected: {exc}") from None
    parsed = dcap_qvl.parse_quote(quote)
    report = parsed.report
    status = str(verified.status)
    advisories = tuple(str(a) for a in verified.advisory_ids)
    if parsed.is_tdx():
        # TDATTRIBUTES bit 0 is DEBUG.
        return QuoteReport(
            tee_type="tdx",
            tcb_status=status,
            advisory_ids=advisories,
            report_data=bytes(report.report_data),
            debug=bool(bytes(report.td_attributes)[0] & 0x01),
            mrtd=bytes(report.mr_td),
            rtmr0=bytes(report.rt_mr0),
            rtmr1=bytes(report.rt_mr1),
            rtmr2=bytes(report.rt_mr2),
            rtmr3=bytes(report.rt_mr3),
            mrconfigid=bytes(report.mr_config_id),
            td_attributes=bytes(report.td_attributes),
            xfam=bytes(report.xfam),
        )
    if parsed.is_sgx():
        # SGX ATTRIBUTES.FLAGS bit 1 is DEBUG.
        isvprodid, isvsvn = sgx_isv(quote, bytes(report.mr_enclave))
        return QuoteReport(
            tee_type="sgx",
            tcb_status=status,
            advisory_ids=advisories,
            report_data=bytes(report.report_data),
            debug=bool(bytes(report.attributes)[0] & 0x02),
            mrenclave=bytes(report.mr_enclave),
            mrsigner=bytes(report.mr_signer),
            isvprodid=isvprodid,
            isvsvn=isvsvn,
        )
    raise FormatError("quote is neither TDX nor SGX")
