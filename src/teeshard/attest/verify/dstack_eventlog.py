"""Replay dstack's RTMR3 event log and read the app's identity from it.

dstack extends RTMR3 at boot with runtime events (``system-preparing``, ``app-id``,
``compose-hash``, ``instance-id``, ``boot-mr-done``, then e.g. ``key-provider`` and
``system-ready``; apps may emit more later). Each event's digest, as in dstack's
``cc-eventlog`` (``RuntimeEvent::digest``, event log version 1), is::

    SHA-384( u32_le(0x08000001) || b":" || event name || b":" || payload )

and RTMR3 = SHA-384(RTMR3 || digest), starting from 48 zero bytes. We recompute
every digest from its payload and never read the log's own ``digest`` field, then
compare the replay with the RTMR3 the verified quote carries. Only then are the
payloads worth anything.

The ``compose-hash`` and ``app-id`` values are taken from the system events before
``boot-mr-done``; events after it can be emitted by the app itself, so an app
cannot forge its own compose hash. Boot-time events (RTMR0-2) have digests over
data the log does not carry; those registers are checked against the policy as
quoted, not replayed.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass

from teeshard.attest.errors import EventLogError

DSTACK_RUNTIME_EVENT_TYPE = 0x08000001
# dstack's boot log is a few KB; a log this large is an attempt to exhaust the verifier.
MAX_EVENT_LOG_BYTES = 1 << 20
RTMR_SIZE = 48
_BOOT_DONE = "boot-mr-done"


@dataclass(frozen=True)
class RuntimeEvent:
    name: str
    payload: bytes


@dataclass(frozen=True)
class DstackInfo:
    """The app identity read from a replayed event log."""

    rtmr3: bytes
    events: tuple[RuntimeEvent, ...]
    compose_hash: bytes | None
    app_id: bytes | None
    instance_id: bytes | None


def event_digest(name: str, payload: bytes) -> bytes:
    """dstack's v1 runtime event digest."""
    data = struct.pack("<I", DSTACK_RUNTIME_EVENT_TYPE) + b":" + name.encode() + b":" + payload
    return hashlib.sha384(data).digest()


def replay(events: list[RuntimeEvent] | tuple[RuntimeEvent, ...]) -> bytes:
    rtmr = bytes(RTMR_SIZE)
    for event in events:
        rtmr = hashlib.sha384(rtmr + event_digest(event.name, event.payload)).digest()
    return rtmr


def parse_rtmr3_events(event_log: str) -> tuple[RuntimeEvent, ...]:
    """The RTMR3 (``imr == 3``) events of a dstack JSON event log, in order."""
    if len(event_log) > MAX_EVENT_LOG_BYTES:
        raise EventLogError(
            f"event log of {len(event_log)} characters refused (limit {MAX_EVENT_LOG_BYTES})"
        )
    try:
        entries = json.loads(event_log)
    except ValueError as exc:
        raise EventLogError(f"event log is not JSON: {exc}") from None
    if not isinstance(entries, list):
        raise EventLogError("event log must be a JSON list")
    events: list[RuntimeEvent] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or entry.get("imr") != 3:
            continue
        if entry.get("event_type") != DSTACK_RUNTIME_EVENT_TYPE:
            raise EventLogError(
                f"event {index} extends RTMR3 with type {entry.get('event_type')!r}; only dstack "
                "runtime events can be recomputed from their payload"
            )
        if entry.get("version", 1) != 1:
            raise EventLogError(
                f"event {index}: event log version {entry.get('version')!r} is not supported"
            )
        name, payload = entry.get("event"), entry.get("event_payload")
        if not isinstance(name, str) or not isinstance(payload, str):
            raise EventLogError(f"event {index}: event name and payload must be strings")
        try:
            events.append(RuntimeEvent(name, bytes.fromhex(payload)))
        except ValueError:
            raise EventLogError(f"event {index} ({name}): payload is not hex") from None
    return tuple(events)


def verify_event_log(event_log: str, quoted_rtmr3: bytes) -> DstackInfo:
    """Replay RTMR3 from ``event_log``; it must equal the quote's RTMR3."""
    events = parse_rtmr3_events(event_log)
    replayed = replay(events)
    if replayed != quoted_rtmr3:
        raise EventLogError(
            f"RTMR3 replayed from the event log ({replayed.hex()[:16]}...) does not match "
            f"the quote's RTMR3 ({quoted_rtmr3.hex()[:16]}...): the event log was altered"
        )
    system: dict[str, bytes] = {}
    for event in events:
        if event.name == _BOOT_DONE:
            break
        if event.name in system:
            raise EventLogError(f"system event {event.name!r} appears twice before boot-mr-done")
        system[event.name] = event.payload
    else:
        system = {}  # no boot-mr-done: nothing in the log is known to come from dstack
    return DstackInfo(
        rtmr3=replayed,
        events=events,
        compose_hash=system.get("compose-hash"),
        app_id=system.get("app-id"),
        instance_id=system.get("instance-id"),
    )
