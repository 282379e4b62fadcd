"""Policy checks decided by the quote and the policy, never by the evidence's label.

Item 13: every TDX policy constrains RTMR3. Item 14: SGX ISVPRODID/ISVSVN, TDX
TD attributes, MRCONFIGID and XFAM, advisory allow-lists. Real quotes throughout:
``tests/attest/data`` (dcap-qvl's samples), verified by dcap-qvl where collateral
exists, parsed only (and marked so) where it does not.
"""

from __future__ import annotations

import dataclasses
import struct

import dcap_qvl
import pytest

from teeshard.attest.errors import (
    MeasurementError,
    PolicyError,
    SimulatedRefused,
    VerificationError,
)
from teeshard.attest.evidence import Evidence
from teeshard.attest.manifest import ShardManifest
from teeshard.attest.verify.bundle import check_report, verify_bundle
from teeshard.attest.verify.policy import Policy
from teeshard.attest.verify.quote import (
    CollateralFile,
    QuoteReport,
    load_collateral,
    read_quote_file,
    sgx_isv,
    verify_quote,
)
from tests.attest.helpers import DATA, VECTOR_TIME, NodeFactory
from tests.attest.test_bundle import tdx_bundle


@pytest.fixture(scope="module")
def tdx_report() -> QuoteReport:
    quote = (DATA / "tdx_quote").read_bytes()
    return verify_quote(quote, load_collateral(DATA / "tdx_quote_collateral.json"), VECTOR_TIME)


@pytest.fixture(scope="module")
def sgx_report() -> QuoteReport:
    quote = (DATA / "sgx_quote").read_bytes()
    return verify_quote(quote, load_collateral(DATA / "sgx_quote_collateral.json"), VECTOR_TIME)


@pytest.fixture(scope="module")
def dstack_report() -> QuoteReport:
    """The real dstack (tappd) quote's registers, parsed, not verified (no collateral ships)."""
    report = dcap_qvl.parse_quote(read_quote_file(DATA / "quote-from-tappd.hex")).report
    return QuoteReport(
        tee_type="tdx", tcb_status="UpToDate", advisory_ids=(), report_data=bytes(64),
        debug=False, mrtd=bytes(report.mr_td), rtmr0=bytes(report.rt_mr0),
        rtmr1=bytes(report.rt_mr1), rtmr2=bytes(report.rt_mr2), rtmr3=bytes(report.rt_mr3),
        mrconfigid=bytes(report.mr_config_id), td_attributes=bytes(report.td_attributes),
        xfam=bytes(report.xfam),
    )  # fmt: skip


def boot_registers(report: QuoteReport) -> Policy:
    """What the review's policy listed: dstack's MRTD and RTMR0-2, nothing for RTMR3."""
    assert report.mrtd and report.rtmr0 and report.rtmr1 and report.rtmr2
    return Policy(
        mrtd=frozenset({report.mrtd}), rtmr0=frozenset({report.rtmr0}),
        rtmr1=frozenset({report.rtmr1}), rtmr2=frozenset({report.rtmr2}),
    )  # fmt: skip


def evidence(provider: str, event_log: str | None = None) -> Evidence:
    return Evidence(provider, "tdx", b"quote", bytes(64), event_log)


# -- 13: RTMR3 -----------------------------------------------------------------------


def test_attack_dstack_quote_relabelled_tsm_is_refused(dstack_report: QuoteReport) -> None:
    """The attack: RTMR3 (the whole app) went unchecked once the label said "tsm"."""
    assert dstack_report.rtmr3 != bytes(48)  # a real app was measured into RTMR3
    policy = boot_registers(dstack_report)
    for label in ("tsm", "dstack", "dstack-tappd", "anything"):
        with pytest.raises(MeasurementError, match="must constrain RTMR3"):
            check_report(dstack_report, evidence(label), policy)


def test_attack_relabelled_real_quote_in_a_bundle(manifests: dict[str, ShardManifest]) -> None:
    """Through verify_bundle with a real, dcap-qvl-verified TDX quote: refused at the policy."""
    bundle, nonce = tdx_bundle(manifests["0:2"])
    report = verify_quote(bundle.evidence.quote, load_collateral(DATA / "tdx_quote_collateral.json"),
                          VECTOR_TIME)  # fmt: skip
    with pytest.raises(MeasurementError, match="must constrain RTMR3"):
        verify_bundle(
            bundle, boot_registers(report), nonce=nonce, now=VECTOR_TIME,
            collateral=CollateralFile(DATA / "tdx_quote_collateral.json"),
            expected_manifest_hash=manifests["0:2"].combined_hash,
        )  # fmt: skip


def test_a_policy_file_that_leaves_rtmr3_open_is_refused_when_loaded(
    dstack_report: QuoteReport,
) -> None:
    assert dstack_report.mrtd is not None
    data = {"tdx": {"mrtd": [dstack_report.mrtd.hex()]}}
    with pytest.raises(PolicyError, match="must constrain RTMR3"):
        Policy.from_mapping(data)
    with pytest.raises(PolicyError, match="contradicts"):
        Policy.from_mapping({"tdx": {**data["tdx"], "allow_any_rtmr3": True, "rtmr3": ["00" * 48]}})
    for rule in ({"rtmr3": ["00" * 48]}, {"allow_any_rtmr3": True}):
        assert Policy.from_mapping({"tdx": {**data["tdx"], **rule}}).constrains_rtmr3
    with_compose = {**data, "dstack": {"compose_hashes": ["00" * 32]}}
    assert Policy.from_mapping(with_compose).constrains_rtmr3


def test_rtmr3_list_and_explicit_any(dstack_report: QuoteReport) -> None:
    assert dstack_report.rtmr3 is not None
    base = boot_registers(dstack_report)
    listed = dataclasses.replace(base, rtmr3=frozenset({dstack_report.rtmr3}))
    assert check_report(dstack_report, evidence("tsm"), listed) is None
    other = dataclasses.replace(base, rtmr3=frozenset({bytes(48)}))
    with pytest.raises(MeasurementError, match=f"RTMR3 {dstack_report.rtmr3.hex()}"):
        check_report(dstack_report, evidence("dstack"), other)
    anything = dataclasses.replace(base, allow_any_rtmr3=True)
    assert check_report(dstack_report, evidence("dstack"), anything) is None
    assert any("allow_any_rtmr3" in w for w in anything.warnings())


def test_compose_hashes_apply_whatever_the_label(dstack_report: QuoteReport) -> None:
    """A policy with compose hashes replays the log for a "tsm" label too; no log, no pass."""
    policy = dataclasses.replace(
        boot_registers(dstack_report), compose_hashes=frozenset({bytes(32)})
    )
    for label in ("tsm", "dstack"):
        with pytest.raises(VerificationError, match="no event log"):
            check_report(dstack_report, evidence(label), policy)


def test_the_quote_decides_tdx_or_sgx_not_the_label(manifests: dict[str, ShardManifest]) -> None:
    bundle, nonce = tdx_bundle(manifests["0:2"])
    relabelled = dataclasses.replace(
        bundle, evidence=dataclasses.replace(bundle.evidence, tee_type="sgx")
    )
    with pytest.raises(VerificationError, match="labelled sgx, the quote is tdx"):
        verify_bundle(
            relabelled, Policy(allow_any_rtmr3=True), nonce=nonce, now=VECTOR_TIME,
            collateral=CollateralFile(DATA / "tdx_quote_collateral.json"),
        )  # fmt: skip


# -- 14: SGX ISVPRODID / ISVSVN --------------------------------------------------------


def test_isv_fields_are_read_from_the_verified_body(sgx_report: QuoteReport) -> None:
    quote = (DATA / "sgx_quote").read_bytes()
    # sgx_report_body_t after the 48-byte header: MRENCLAVE at 64, ISVPRODID/ISVSVN at 256
    assert quote[48 + 64 : 48 + 96] == sgx_report.mrenclave
    assert (sgx_report.isvprodid, sgx_report.isvsvn) == struct.unpack_from("<HH", quote, 304)
    assert sgx_report.measurements()["isvprodid"] == str(sgx_report.isvprodid)
    with pytest.raises(VerificationError, match="cannot locate the SGX report body"):
        sgx_isv(quote, bytes(32))


def sgx_policy(report: QuoteReport, **changes: object) -> Policy:
    assert report.mrsigner is not None
    policy = Policy(
        allowed_tcb_statuses=frozenset({report.tcb_status}),
        allowed_advisory_ids=frozenset(report.advisory_ids),
        mrsigner=frozenset({report.mrsigner}),
        isvprodid=report.isvprodid,
    )
    return dataclasses.replace(policy, **changes)


def test_mrsigner_only_policies_must_name_the_product(sgx_report: QuoteReport) -> None:
    sgx = Evidence("gramine", "sgx", b"q", bytes(64))
    assert check_report(sgx_report, sgx, sgx_policy(sgx_report)) is None
    # any enclave of the signer would pass: refused when checked, and when loaded
    with pytest.raises(MeasurementError, match=r"must name sgx\.isvprodid"):
        check_report(sgx_report, sgx, sgx_policy(sgx_report, isvprodid=None))
    assert sgx_report.mrsigner is not None
    with pytest.raises(PolicyError, match=r"must name sgx\.isvprodid"):
        Policy.from_mapping({"sgx": {"mrsigner": [sgx_report.mrsigner.hex()]}})
    assert sgx_report.isvprodid is not None
    with pytest.raises(MeasurementError, match=f"ISVPRODID {sgx_report.isvprodid} is not"):
        check_report(sgx_report, sgx, sgx_policy(sgx_report, isvprodid=sgx_report.isvprodid + 1))


def test_minimum_isvsvn(sgx_report: QuoteReport) -> None:
    sgx = Evidence("gramine", "sgx", b"q", bytes(64))
    assert sgx_report.isvsvn is not None
    at = sgx_policy(sgx_report, min_isvsvn=sgx_report.isvsvn)
    assert check_report(sgx_report, sgx, at) is None
    with pytest.raises(MeasurementError, match="below the policy's minimum"):
        check_report(sgx_report, sgx, sgx_policy(sgx_report, min_isvsvn=sgx_report.isvsvn + 1))
    # with MRENCLAVE too, the product and version still apply
    assert sgx_report.mrenclave is not None
    both = sgx_policy(sgx_report, mrenclave=frozenset({sgx_report.mrenclave}), min_isvsvn=9)
    with pytest.raises(MeasurementError, match="ISVSVN"):
        check_report(sgx_report, sgx, both)


# -- 14: TDX attributes, MRCONFIGID, XFAM --------------------------------------------


def tdx_policy(report: QuoteReport, **changes: object) -> Policy:
    assert report.rtmr3 is not None
    policy = dataclasses.replace(boot_registers(report), rtmr3=frozenset({report.rtmr3}))
    return dataclasses.replace(policy, **changes)


def test_td_attributes_mask(tdx_report: QuoteReport) -> None:
    assert tdx_report.td_attributes == bytes.fromhex("0000001000000000")  # SEPT_VE_DISABLE
    tsm = evidence("tsm")
    mask = bytes.fromhex("0100001000000000")  # DEBUG and SEPT_VE_DISABLE
    wanted = dataclasses.replace(
        tdx_policy(tdx_report),
        td_attributes_mask=mask,
        td_attributes=bytes.fromhex("00000010" + "00" * 4),
    )
    assert check_report(tdx_report, tsm, wanted) is None
    unwanted = dataclasses.replace(wanted, td_attributes=bytes(8))
    with pytest.raises(MeasurementError, match="TDATTRIBUTES 0000001000000000 under mask"):
        check_report(tdx_report, tsm, unwanted)


def test_mrconfigid_and_xfam_where_given(tdx_report: QuoteReport) -> None:
    assert tdx_report.mrconfigid is not None and tdx_report.xfam is not None
    tsm = evidence("tsm")
    listed = tdx_policy(
        tdx_report, mrconfigid=frozenset({tdx_report.mrconfigid}), xfam=frozenset({tdx_report.xfam})
    )
    assert check_report(tdx_report, tsm, listed) is None
    with pytest.raises(MeasurementError, match="MRCONFIGID"):
        check_report(
            tdx_report, tsm, dataclasses.replace(listed, mrconfigid=frozenset({b"\1" * 48}))
        )
    with pytest.raises(MeasurementError, match="XFAM e702060000000000"):
        check_report(tdx_report, tsm, dataclasses.replace(listed, xfam=frozenset({bytes(8)})))


def test_tdx_advisories_must_be_listed(tdx_report: QuoteReport) -> None:
    """The real TDX sample has none; one it would carry is refused until listed."""
    assert tdx_report.advisory_ids == ()
    exposed = dataclasses.replace(tdx_report, advisory_ids=("INTEL-SA-01079",))
    with pytest.raises(VerificationError, match="advisory INTEL-SA-01079"):
        check_report(exposed, evidence("tsm"), tdx_policy(tdx_report))
    listed = tdx_policy(tdx_report, allowed_advisory_ids=frozenset({"INTEL-SA-01079"}))
    assert check_report(exposed, evidence("tsm"), listed) is None


def test_simulated_bytes_under_a_tdx_label_are_still_simulated(
    make_node: NodeFactory, manifests: dict[str, ShardManifest]
) -> None:
    node = make_node(manifests["0:2"])
    nonce = bytes(32)
    bundle = node.bundle(nonce)
    disguised = dataclasses.replace(
        bundle, evidence=dataclasses.replace(bundle.evidence, tee_type="tdx", insecure=False)
    )
    expected = manifests["0:2"].combined_hash
    with pytest.raises(SimulatedRefused):
        verify_bundle(disguised, Policy(), nonce=nonce, expected_manifest_hash=expected)
    with pytest.raises(VerificationError, match="labelled tdx, the quote is simulated"):
        verify_bundle(
            disguised, Policy(allow_simulated=True), nonce=nonce, expected_manifest_hash=expected
        )
