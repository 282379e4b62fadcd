"""Real DCAP quote verification with dcap-qvl against Phala's sample quotes and collateral."""

from __future__ import annotations

import struct
from pathlib import Path

import dcap_qvl
import pytest

from teeshard.attest.errors import CollateralError, QuoteError
from teeshard.attest.verify.quote import (
    CollateralFile,
    PccsCollateral,
    load_collateral,
    read_quote_file,
    verify_quote,
)
from tests.attest.helpers import DATA, VECTOR_TIME

TDX = (DATA / "tdx_quote").read_bytes()
SGX = (DATA / "sgx_quote").read_bytes()


def tdx_collateral() -> object:
    return load_collateral(DATA / "tdx_quote_collateral.json")


def sgx_collateral() -> object:
    return load_collateral(DATA / "sgx_quote_collateral.json")


def test_tdx_sample_is_up_to_date() -> None:
    report = verify_quote(TDX, tdx_collateral(), VECTOR_TIME)
    assert report.tee_type == "tdx"
    assert report.tcb_status == "UpToDate"
    assert report.advisory_ids == ()
    assert report.debug is False
    assert report.mrtd is not None and report.mrtd.hex().startswith("91eb2b44d141d4ec")
    assert report.rtmr3 == bytes(48)
    assert len(report.report_data) == 64
    assert report.mrenclave is None


def test_sgx_sample_needs_configuration_and_hardening() -> None:
    report = verify_quote(SGX, sgx_collateral(), VECTOR_TIME)
    assert report.tee_type == "sgx"
    assert report.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert set(report.advisory_ids) == {"INTEL-SA-00289", "INTEL-SA-00615"}
    assert report.mrenclave is not None and report.mrenclave.hex().startswith("33d8736db756ed49")
    assert report.mrsigner is not None and report.mrsigner.hex().startswith("815f42f11cf64430")
    assert report.report_data.startswith(b"Hello, world!")
    assert report.debug is False


def test_outdated_tdx_sample_fails_at_vector_time() -> None:
    quote = (DATA / "tdx_quote_outdated").read_bytes()
    collateral = load_collateral(DATA / "tdx_quote_outdated_collateral.json")
    with pytest.raises(QuoteError, match="quote rejected"):
        verify_quote(quote, collateral, VECTOR_TIME)


def test_outdated_tdx_sample_fails_within_its_own_collateral_validity() -> None:
    quote = (DATA / "tdx_quote_outdated").read_bytes()
    collateral = load_collateral(DATA / "tdx_quote_outdated_collateral.json")
    # 2026-02-18T11:58:51Z: one hour after that collateral was issued.
    with pytest.raises(QuoteError, match="TCB"):
        verify_quote(quote, collateral, 1771415931)


@pytest.mark.parametrize(
    "when",
    [
        1752923763,  # one hour after the TCB info's nextUpdate (2025-07-19)
        1700000000,  # before the collateral was issued (2023)
    ],
)
def test_time_outside_collateral_validity_fails(when: int) -> None:
    with pytest.raises(QuoteError):
        verify_quote(TDX, tdx_collateral(), when)
    with pytest.raises(QuoteError):
        verify_quote(SGX, sgx_collateral(), when)


def test_collateral_of_another_platform_fails() -> None:
    with pytest.raises(QuoteError):
        verify_quote(TDX, sgx_collateral(), VECTOR_TIME)


def _signed_regions(quote: bytes, body_size: int) -> list[tuple[str, int, int]]:
    """Byte ranges whose every byte is covered by a signature in a v3 (SGX) / v4 (TDX) quote.

    header || body (signed by the attestation key), the ECDSA signature and the
    attestation key itself (hashed into the QE report), the QE report and its
    signature by the PCK key.
    """
    signed_end = 48 + body_size
    sig_data = signed_end + 4
    regions = [
        ("header", 0, 48),
        ("body", 48, signed_end),
        ("quote signature", sig_data, sig_data + 64),
        ("attestation key", sig_data + 64, sig_data + 128),
    ]
    (version,) = struct.unpack_from("<H", quote, 0)
    if version == 3:  # v3: the QE report follows the attestation key directly
        qe = sig_data + 128
    else:  # v4: certification data of type 6 wraps the QE report
        cert_type, _ = struct.unpack_from("<HI", quote, sig_data + 128)
        assert cert_type == 6
        qe = sig_data + 128 + 6
    regions += [("QE report", qe, qe + 384), ("QE report signature", qe + 384, qe + 448)]
    return regions


@pytest.mark.parametrize(
    ("quote", "collateral_file", "body_size"),
    [(TDX, "tdx_quote_collateral.json", 584), (SGX, "sgx_quote_collateral.json", 384)],
    ids=["tdx", "sgx"],
)
def test_any_changed_byte_in_the_signed_part_fails(
    quote: bytes, collateral_file: str, body_size: int
) -> None:
    collateral = load_collateral(DATA / collateral_file)
    verify_quote(quote, collateral, VECTOR_TIME)  # the untouched quote verifies
    regions = _signed_regions(quote, body_size)
    assert [name for name, _, _ in regions][-1] == "QE report signature"
    accepted = []
    for name, start, end in regions:
        for offset in range(start, end):
            tampered = bytearray(quote)
            tampered[offset] ^= 0x01
            try:
                verify_quote(bytes(tampered), collateral, VECTOR_TIME)
            except QuoteError:
                continue
            accepted.append((name, offset))
    assert accepted == []


def test_quote_file_reads_binary_and_hex(tmp_path: Path) -> None:
    hex_file = tmp_path / "q.hex"
    hex_file.write_text(TDX.hex() + "\n")
    assert read_quote_file(hex_file) == TDX
    assert read_quote_file(DATA / "tdx_quote") == TDX
    tappd = read_quote_file(DATA / "quote-from-tappd.hex")
    assert dcap_qvl.parse_quote(tappd).is_tdx()


def test_collateral_file_source_and_errors(tmp_path: Path) -> None:
    source = CollateralFile(DATA / "tdx_quote_collateral.json")
    assert verify_quote(TDX, source, VECTOR_TIME).tcb_status == "UpToDate"
    with pytest.raises(CollateralError, match="cannot read"):
        load_collateral(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(CollateralError, match="malformed"):
        load_collateral(bad)


def test_pccs_collateral_is_fetched_once_per_platform() -> None:
    """The PCCS fetch is replaced by a local coroutine (no network here); caching is real."""
    calls: list[tuple[str, bytes]] = []

    async def fetch(url: str, quote: bytes) -> object:
        calls.append((url, quote))
        return tdx_collateral()

    source = PccsCollateral("https://pccs.example", fetch=fetch)
    assert verify_quote(TDX, source, VECTOR_TIME).tcb_status == "UpToDate"
    assert verify_quote(TDX, source, VECTOR_TIME).tcb_status == "UpToDate"
    assert calls == [("https://pccs.example", TDX)]


def test_pccs_failure_is_a_collateral_error() -> None:
    async def fetch(url: str, quote: bytes) -> object:
        raise ValueError("connection refused")

    with pytest.raises(CollateralError, match="connection refused"):
        PccsCollateral("https://pccs.example", fetch=fetch).get(TDX)
