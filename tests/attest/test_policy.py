"""Policies: strict parsing, and measurements/TCB statuses checked against real quotes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from teeshard.attest.errors import MeasurementError, PolicyError, TcbStatusError
from teeshard.attest.evidence import Evidence
from teeshard.attest.verify.bundle import check_report
from teeshard.attest.verify.policy import Policy
from teeshard.attest.verify.quote import QuoteReport, load_collateral, verify_quote
from teeshard.model.layer_range import LayerRange
from tests.attest.helpers import DATA, VECTOR_TIME


@pytest.fixture(scope="module")
def tdx_report() -> QuoteReport:
    quote = (DATA / "tdx_quote").read_bytes()
    return verify_quote(quote, load_collateral(DATA / "tdx_quote_collateral.json"), VECTOR_TIME)


@pytest.fixture(scope="module")
def sgx_report() -> QuoteReport:
    quote = (DATA / "sgx_quote").read_bytes()
    return verify_quote(quote, load_collateral(DATA / "sgx_quote_collateral.json"), VECTOR_TIME)


def tdx_evidence(provider: str = "tsm") -> Evidence:
    return Evidence(provider, "tdx", b"quote", bytes(64))


def tdx_policy(report: QuoteReport) -> Policy:
    assert report.mrtd and report.rtmr0 and report.rtmr1 and report.rtmr2 and report.rtmr3
    return Policy(
        mrtd=frozenset({report.mrtd}),
        rtmr0=frozenset({report.rtmr0}),
        rtmr1=frozenset({report.rtmr1}),
        rtmr2=frozenset({report.rtmr2}),
        rtmr3=frozenset({report.rtmr3}),
    )


def test_policy_listing_the_tdx_measurements_passes(tdx_report: QuoteReport) -> None:
    assert check_report(tdx_report, tdx_evidence(), tdx_policy(tdx_report)) is None


@pytest.mark.parametrize("register", ["mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3"])
def test_policy_not_listing_a_tdx_measurement_fails(tdx_report: QuoteReport, register: str) -> None:
    policy = dataclasses.replace(tdx_policy(tdx_report), **{register: frozenset({b"\x01" * 48})})
    value = getattr(tdx_report, register).hex()
    with pytest.raises(MeasurementError, match=f"{register.upper()} {value} is not allowed"):
        check_report(tdx_report, tdx_evidence(), policy)


def test_empty_policy_allows_nothing(tdx_report: QuoteReport, sgx_report: QuoteReport) -> None:
    with pytest.raises(MeasurementError, match="MRTD"):
        check_report(tdx_report, tdx_evidence(), Policy())
    sgx_ok = Policy(
        allowed_tcb_statuses=frozenset({"ConfigurationAndSWHardeningNeeded"}),
        allowed_advisory_ids=frozenset(sgx_report.advisory_ids),
    )
    with pytest.raises(MeasurementError, match="no MRENCLAVE or MRSIGNER"):
        check_report(sgx_report, Evidence("gramine", "sgx", b"q", bytes(64)), sgx_ok)


def test_tcb_status_must_be_allowed(sgx_report: QuoteReport) -> None:
    assert sgx_report.mrenclave is not None and sgx_report.mrsigner is not None
    evidence = Evidence("gramine", "sgx", b"q", bytes(64))
    strict = Policy(mrenclave=frozenset({sgx_report.mrenclave}))
    with pytest.raises(TcbStatusError, match=r"ConfigurationAndSWHardeningNeeded.*INTEL-SA-00289"):
        check_report(sgx_report, evidence, strict)
    status_only = dataclasses.replace(
        strict, allowed_tcb_statuses=frozenset({"UpToDate", "ConfigurationAndSWHardeningNeeded"})
    )
    # the status alone is not enough: each advisory the platform is exposed to is listed
    with pytest.raises(TcbStatusError, match="advisory INTEL-SA-00289, INTEL-SA-00615 is not"):
        check_report(sgx_report, evidence, status_only)
    one = dataclasses.replace(status_only, allowed_advisory_ids=frozenset({"INTEL-SA-00289"}))
    with pytest.raises(TcbStatusError, match="advisory INTEL-SA-00615 is not"):
        check_report(sgx_report, evidence, one)
    relaxed = dataclasses.replace(
        status_only, allowed_advisory_ids=frozenset({"INTEL-SA-00289", "INTEL-SA-00615"})
    )
    assert check_report(sgx_report, evidence, relaxed) is None
    by_signer = dataclasses.replace(
        relaxed, mrenclave=frozenset(), mrsigner=frozenset({sgx_report.mrsigner}), isvprodid=0
    )
    assert check_report(sgx_report, evidence, by_signer) is None
    wrong_signer = dataclasses.replace(by_signer, mrsigner=frozenset({bytes(32)}))
    with pytest.raises(MeasurementError, match="MRSIGNER"):
        check_report(sgx_report, evidence, wrong_signer)


def test_debug_td_is_refused_unless_allowed(tdx_report: QuoteReport) -> None:
    debug = dataclasses.replace(tdx_report, debug=True)
    with pytest.raises(MeasurementError, match="debug mode"):
        check_report(debug, tdx_evidence(), tdx_policy(tdx_report))
    allowed = dataclasses.replace(tdx_policy(tdx_report), allow_debug=True)
    assert check_report(debug, tdx_evidence(), allowed) is None


POLICY_TOML = """
allowed_tcb_statuses = ["UpToDate", "SWHardeningNeeded"]
allow_simulated = true
max_evidence_age_s = 60

allowed_advisory_ids = ["INTEL-SA-00615"]

[tdx]
mrtd = ["{h48}"]
rtmr0 = ["{h48}"]
mrconfigid = ["{h48}"]
xfam = ["e702060000000000"]
td_attributes_mask = "0100001000000000"
td_attributes = "0000001000000000"

[dstack]
compose_hashes = ["{h32}"]

[sgx]
mrenclave = ["{h32}"]
isvprodid = 7
min_isvsvn = 2

[[manifests]]
model = "tiny"
layers = "0:2"
hash = "{h32}"

[[manifests]]
layers = "2:3"
hash = "{other}"
"""


def test_policy_file_toml_and_json(tmp_path: Path) -> None:
    text = POLICY_TOML.format(h48="ab" * 48, h32="cd" * 32, other="ef" * 32)
    path = tmp_path / "policy.toml"
    path.write_text(text)
    policy = Policy.load(path)
    assert policy.allowed_tcb_statuses == {"UpToDate", "SWHardeningNeeded"}
    assert policy.allow_simulated and not policy.allow_debug
    assert policy.max_evidence_age_s == 60
    assert policy.mrtd == {bytes.fromhex("ab" * 48)} and policy.rtmr1 == frozenset()
    assert policy.compose_hashes and not policy.rtmr3 and not policy.allow_any_rtmr3
    assert policy.allowed_advisory_ids == {"INTEL-SA-00615"}
    assert policy.mrconfigid == {bytes.fromhex("ab" * 48)}
    assert policy.xfam == {bytes.fromhex("e702060000000000")}
    assert policy.td_attributes_mask == bytes.fromhex("0100001000000000")
    assert policy.td_attributes == bytes.fromhex("0000001000000000")
    assert (policy.isvprodid, policy.min_isvsvn) == (7, 2)
    assert policy.expected_manifest("tiny", LayerRange(0, 2)) == bytes.fromhex("cd" * 32)
    assert policy.expected_manifest("other", LayerRange(0, 2)) is None
    assert policy.expected_manifest("any", LayerRange(2, 3)) == bytes.fromhex("ef" * 32)
    as_json = tmp_path / "policy.json"
    as_json.write_text(
        json.dumps({"allow_simulated": True, "sgx": {"mrsigner": ["00" * 32], "isvprodid": 3}})
    )
    assert Policy.load(as_json).mrsigner == {bytes(32)}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"allow_simulatd": True}, "unknown field"),
        ({"tdx": {"mrtd": ["ab"]}}, "expected 48 bytes"),
        ({"tdx": {"mrenclave": []}}, "unknown field"),
        ({"allowed_tcb_statuses": ["Fine"]}, "each must be one of"),
        ({"allow_debug": "yes"}, "true or false"),
        ({"max_evidence_age_s": 0}, "positive integer"),
        ({"manifests": [{"layers": "2:1", "hash": "00" * 32}]}, "layers"),
        ({"manifests": [{"layers": "0:1"}]}, "missing field"),
        ({"dstack": {"compose_hashes": ["zz"]}}, "not valid hex"),
        ({"tdx": {"xfam": ["00" * 4]}}, "expected 8 bytes"),
        ({"tdx": {"allow_any_rtmr3": 1}}, "true or false"),
        ({"sgx": {"isvprodid": 65536}}, "integer from 0 to 65535"),
        ({"sgx": {"min_isvsvn": -1}}, "integer from 0 to 65535"),
        ({"allowed_advisory_ids": "INTEL-SA-00615"}, "list of strings"),
        ({"tdx": {"td_attributes_mask": "00" * 8}}, "go together"),
        (
            {"tdx": {"td_attributes_mask": "01" + "00" * 7, "td_attributes": "02" + "00" * 7}},
            "outside",
        ),
    ],
)
def test_bad_policies_are_refused(data: dict[str, object], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        Policy.from_mapping(data)


def test_unparseable_policy_file(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text("allow_simulated = = true")
    with pytest.raises(PolicyError, match="does not parse"):
        Policy.load(path)
