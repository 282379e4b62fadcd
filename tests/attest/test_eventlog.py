"""dstack RTMR3 event log replay: digests recomputed from payloads, compared with the quote."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from teeshard.attest.errors import EventLogError, MeasurementError
from teeshard.attest.evidence import Evidence
from teeshard.attest.verify.bundle import check_report
from teeshard.attest.verify.dstack_eventlog import (
    RuntimeEvent,
    event_digest,
    replay,
    verify_event_log,
)
from teeshard.attest.verify.policy import Policy
from teeshard.attest.verify.quote import QuoteReport, read_quote_file
from tests.attest.helpers import DATA

COMPOSE = hashlib.sha256(b"services: {}").digest()
APP_ID = bytes(range(20))


def boot_events(compose: bytes = COMPOSE) -> list[RuntimeEvent]:
    return [
        RuntimeEvent("system-preparing", b""),
        RuntimeEvent("app-id", APP_ID),
        RuntimeEvent("compose-hash", compose),
        RuntimeEvent("instance-id", b"\x07" * 20),
        RuntimeEvent("boot-mr-done", b""),
        RuntimeEvent("system-ready", b""),
    ]


def as_log(events: list[RuntimeEvent], digest: str = "") -> str:
    """The JSON shape dstack's guest agent returns, with boot-time entries for RTMR0-2 first."""
    entries: list[dict[str, object]] = [
        {"imr": 0, "event_type": 1, "digest": "11" * 48, "event": "", "event_payload": "00"},
        {"imr": 1, "event_type": 2147483651, "digest": "22" * 48, "event": "", "event_payload": ""},
    ]
    entries += [
        {
            "imr": 3,
            "event_type": 0x08000001,
            "digest": digest,
            "event": e.name,
            "event_payload": e.payload.hex(),
        }
        for e in events
    ]
    return json.dumps(entries)


def independent_replay(events: list[RuntimeEvent]) -> bytes:
    """Written out by hand from dstack's cc-eventlog (RuntimeEvent v1 digest, replay_events)."""
    rtmr = b"\0" * 48
    for event in events:
        preimage = b"\x01\x00\x00\x08" + b":" + event.name.encode() + b":" + event.payload
        rtmr = hashlib.sha384(rtmr + hashlib.sha384(preimage).digest()).digest()
    return rtmr


def test_digest_matches_dstack_v1_scheme() -> None:
    # The example of dstack's own unit test v1_digest_unchanged: app-id, payload deadbeef.
    expected = hashlib.sha384(b"\x01\x00\x00\x08:app-id:\xde\xad\xbe\xef").digest()
    assert event_digest("app-id", bytes.fromhex("deadbeef")) == expected


def test_replay_matches_and_extracts_the_app_identity() -> None:
    events = boot_events()
    rtmr3 = independent_replay(events)
    assert replay(events) == rtmr3
    info = verify_event_log(as_log(events), rtmr3)
    assert info.compose_hash == COMPOSE
    assert info.app_id == APP_ID
    assert info.instance_id == b"\x07" * 20
    assert [e.name for e in info.events] == [e.name for e in events]


def test_digest_fields_in_the_log_are_never_trusted() -> None:
    events = boot_events()
    rtmr3 = independent_replay(events)
    # Garbage digests change nothing: the verifier recomputes each one from its payload.
    assert verify_event_log(as_log(events, digest="ff" * 48), rtmr3).compose_hash == COMPOSE


@pytest.mark.parametrize("index", range(6))
def test_a_changed_payload_or_name_breaks_the_replay(index: int) -> None:
    events = boot_events()
    rtmr3 = independent_replay(events)
    changed = list(events)
    changed[index] = RuntimeEvent(events[index].name, events[index].payload + b"\x00")
    with pytest.raises(EventLogError, match="does not match the quote's RTMR3"):
        verify_event_log(as_log(changed), rtmr3)
    renamed = list(events)
    renamed[index] = RuntimeEvent(events[index].name + "x", events[index].payload)
    with pytest.raises(EventLogError, match="does not match"):
        verify_event_log(as_log(renamed), rtmr3)


def test_dropped_or_reordered_events_break_the_replay() -> None:
    events = boot_events()
    rtmr3 = independent_replay(events)
    with pytest.raises(EventLogError):
        verify_event_log(as_log(events[:-1]), rtmr3)
    with pytest.raises(EventLogError):
        verify_event_log(as_log([events[1], events[0], *events[2:]]), rtmr3)


def test_compose_hash_emitted_after_boot_is_ignored() -> None:
    """An app can emit events after boot-mr-done; it cannot replace the compose hash."""
    events = [*boot_events(), RuntimeEvent("compose-hash", b"\xee" * 32)]
    info = verify_event_log(as_log(events), independent_replay(events))
    assert info.compose_hash == COMPOSE


def test_malformed_logs_are_refused() -> None:
    with pytest.raises(EventLogError, match="not JSON"):
        verify_event_log("{", bytes(48))
    foreign = json.dumps([{"imr": 3, "event_type": 1, "event": "x", "event_payload": ""}])
    with pytest.raises(EventLogError, match="only dstack runtime events"):
        verify_event_log(foreign, bytes(48))
    bad_hex = json.dumps(
        [{"imr": 3, "event_type": 0x08000001, "event": "x", "event_payload": "zz"}]
    )
    with pytest.raises(EventLogError, match="not hex"):
        verify_event_log(bad_hex, bytes(48))
    v2 = json.dumps(
        [{"imr": 3, "event_type": 0x08000001, "event": "x", "event_payload": "", "version": 2}]
    )
    with pytest.raises(EventLogError, match="version"):
        verify_event_log(v2, bytes(48))


def test_real_tappd_quote_rtmr3_is_not_matched_by_a_made_up_log() -> None:
    """quote-from-tappd.hex is a real dstack quote: its RTMR3 was extended at boot."""
    import dcap_qvl

    quote = read_quote_file(DATA / "quote-from-tappd.hex")
    rtmr3 = bytes(dcap_qvl.parse_quote(quote).report.rt_mr3)
    assert rtmr3 != bytes(48)
    with pytest.raises(EventLogError, match="does not match"):
        verify_event_log(as_log(boot_events()), rtmr3)


def dstack_report(rtmr3: bytes) -> QuoteReport:
    return QuoteReport(
        tee_type="tdx", tcb_status="UpToDate", advisory_ids=(), report_data=bytes(64),
        debug=False, mrtd=b"\x01" * 48, rtmr0=b"\x02" * 48, rtmr1=b"\x03" * 48,
        rtmr2=b"\x04" * 48, rtmr3=rtmr3,
    )  # fmt: skip


DSTACK_POLICY = Policy(
    mrtd=frozenset({b"\x01" * 48}),
    rtmr0=frozenset({b"\x02" * 48}),
    rtmr1=frozenset({b"\x03" * 48}),
    rtmr2=frozenset({b"\x04" * 48}),
    compose_hashes=frozenset({COMPOSE}),
)


@pytest.mark.parametrize("provider", ["dstack", "dstack-tappd", "tsm"])
def test_policy_compose_hash_checked_from_the_replayed_log(provider: str) -> None:
    events = boot_events()
    report = dstack_report(independent_replay(events))
    evidence = Evidence(provider, "tdx", b"q", bytes(64), as_log(events))
    info = check_report(report, evidence, DSTACK_POLICY)
    assert info is not None and info.compose_hash == COMPOSE
    other = boot_events(compose=b"\x99" * 32)
    evidence = Evidence(provider, "tdx", b"q", bytes(64), as_log(other))
    with pytest.raises(MeasurementError, match="compose hash 9999"):
        check_report(dstack_report(independent_replay(other)), evidence, DSTACK_POLICY)


def test_app_ids_and_missing_log() -> None:
    events = boot_events()
    report = dstack_report(independent_replay(events))
    evidence = Evidence("dstack", "tdx", b"q", bytes(64), as_log(events))
    wrong_app = dataclasses.replace(DSTACK_POLICY, app_ids=frozenset({b"\x00" * 20}))
    with pytest.raises(MeasurementError, match="app id"):
        check_report(report, evidence, wrong_app)
    right_app = dataclasses.replace(DSTACK_POLICY, app_ids=frozenset({APP_ID}))
    assert check_report(report, evidence, right_app) is not None
    without_log = Evidence("dstack", "tdx", b"q", bytes(64), None)
    with pytest.raises(EventLogError, match="no event log"):
        check_report(report, without_log, DSTACK_POLICY)
