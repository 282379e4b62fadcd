"""Apply a policy to what a verified quote says (pure: no I/O, no clock).

What is checked depends on two things only: the kind of quote (TDX or SGX, from
the verified quote itself, :attr:`QuoteReport.tee_type`) and the policy. The
evidence's ``provider`` label is self-reported by the node and never decides
anything: a dstack quote relabelled ``tsm`` faces exactly the checks it would face
as ``dstack``. Only the evidence's event log is read, and only when the policy asks
for dstack compose hashes.

Order: TCB status and advisories, debug mode, then per kind:

* TDX: MRTD and RTMR0-2 listed; RTMR3 constrained (compose hash replayed from the
  event log, an ``rtmr3`` list, or an explicit ``allow_any_rtmr3``); MRCONFIGID,
  XFAM and the TD-attributes mask where the policy gives them.
* SGX: MRENCLAVE and/or MRSIGNER listed; ISVPRODID (required with MRSIGNER only)
  and the minimum ISVSVN.
"""

from __future__ import annotations

from teeshard.attest.errors import EventLogError, MeasurementError, TcbStatusError
from teeshard.attest.evidence import Evidence
from teeshard.attest.verify.dstack_eventlog import DstackInfo, verify_event_log
from teeshard.attest.verify.policy import RTMR3_RULE, Policy
from teeshard.attest.verify.quote import QuoteReport


def check_report(report: QuoteReport, evidence: Evidence, policy: Policy) -> DstackInfo | None:
    """Raise a VerificationError subclass unless ``policy`` accepts ``report``.

    Returns the replayed dstack identity when the policy checked compose hashes.
    """
    _check_tcb(report, policy)
    if report.debug and not policy.allow_debug:
        raise MeasurementError(f"the {report.tee_type.upper()} runs in debug mode")
    if report.tee_type == "sgx":
        _check_sgx(report, policy)
        return None
    if report.tee_type != "tdx":
        raise MeasurementError(f"no policy checks for {report.tee_type} quotes")
    return _check_tdx(report, evidence.event_log, policy)


def _check_tcb(report: QuoteReport, policy: Policy) -> None:
    advisories = ", ".join(report.advisory_ids) or "none"
    if report.tcb_status not in policy.allowed_tcb_statuses:
        raise TcbStatusError(
            f"TCB status {report.tcb_status} is not allowed (allowed: "
            f"{', '.join(sorted(policy.allowed_tcb_statuses))}; advisories: {advisories})"
        )
    unlisted = [a for a in report.advisory_ids if a not in policy.allowed_advisory_ids]
    if unlisted:
        raise TcbStatusError(
            f"advisory {', '.join(unlisted)} is not in the policy's allowed_advisory_ids "
            f"(TCB status {report.tcb_status}; advisories: {advisories})"
        )


def _check_tdx(report: QuoteReport, event_log: str | None, policy: Policy) -> DstackInfo | None:
    for name in ("mrtd", "rtmr0", "rtmr1", "rtmr2"):
        _check_listed(name.upper(), getattr(report, name), getattr(policy, name))
    if not policy.constrains_rtmr3:
        raise MeasurementError(f"TDX quote refused: {RTMR3_RULE}")
    if policy.rtmr3:
        _check_listed("RTMR3", report.rtmr3, policy.rtmr3)
    if policy.mrconfigid:
        _check_listed("MRCONFIGID", report.mrconfigid, policy.mrconfigid)
    if policy.xfam:
        _check_listed("XFAM", report.xfam, policy.xfam)
    if policy.td_attributes_mask is not None and policy.td_attributes is not None:
        _check_masked(report.td_attributes, policy.td_attributes_mask, policy.td_attributes)
    if not policy.compose_hashes:
        return None
    if event_log is None or report.rtmr3 is None:
        raise EventLogError("the policy requires a dstack compose hash; no event log was given")
    info = verify_event_log(event_log, report.rtmr3)
    if info.compose_hash is None:
        raise EventLogError("the event log has no compose-hash system event")
    _check_listed("dstack compose hash", info.compose_hash, policy.compose_hashes)
    if policy.app_ids:
        if info.app_id is None:
            raise EventLogError("the event log has no app-id system event")
        _check_listed("dstack app id", info.app_id, policy.app_ids)
    return info


def _check_masked(value: bytes | None, mask: bytes, expected: bytes) -> None:
    if value is None or bytes(v & m for v, m in zip(value, mask, strict=True)) != expected:
        shown = value.hex() if value is not None else "missing"
        raise MeasurementError(
            f"TDATTRIBUTES {shown} under mask {mask.hex()} is not the policy's {expected.hex()}"
        )


def _check_sgx(report: QuoteReport, policy: Policy) -> None:
    if not policy.mrenclave and not policy.mrsigner:
        raise MeasurementError("SGX quote, but the policy lists no MRENCLAVE or MRSIGNER")
    if policy.mrsigner_only and policy.isvprodid is None:
        raise MeasurementError(
            "SGX quote refused: a policy listing only MRSIGNER must name sgx.isvprodid"
        )
    if policy.mrenclave:
        _check_listed("MRENCLAVE", report.mrenclave, policy.mrenclave)
    if policy.mrsigner:
        _check_listed("MRSIGNER", report.mrsigner, policy.mrsigner)
    if policy.isvprodid is not None and report.isvprodid != policy.isvprodid:
        raise MeasurementError(
            f"ISVPRODID {report.isvprodid} is not the policy's {policy.isvprodid}"
        )
    if report.isvsvn is None or report.isvsvn < policy.min_isvsvn:
        raise MeasurementError(
            f"ISVSVN {report.isvsvn} is below the policy's minimum {policy.min_isvsvn}"
        )


def _check_listed(name: str, value: bytes | None, allowed: frozenset[bytes]) -> None:
    if value is None or value not in allowed:
        shown = value.hex() if value is not None else "missing"
        raise MeasurementError(
            f"{name} {shown} is not allowed by the policy ({len(allowed)} value(s) listed)"
        )
