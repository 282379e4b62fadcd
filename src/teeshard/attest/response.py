"""Does a receipt chain prove *this* answer to *this* request? The rules, as pure functions.

A genuine receipt chain alone proves only that some request ran through attested
stages. :func:`verify_response` ties it to what the user holds:

* the response's completion token ids hash to the last stage's ``sent`` hash
  (the last stage hashes each token it returns as ``struct.pack("<I", id)``
  through :class:`~teeshard.attest.receipts.TrafficHash`);
* the text decodes from those ids with the *attested* tokenizer: the caller
  passes the entry files it measured from a checkpoint directory, which must
  equal stage 0's attested entry section, and a ``decode`` made from the same
  directory (a final end-of-sequence id is not text; stop sequences from the
  request body cut the text where the entry node cut it; ``echo`` prepends the
  prompt);
* the response id (``chatcmpl-<id>``, ``cmpl-<id>``) and the extension's request id
  are the receipts' request id;
* stage 0 received exactly the request body (SHA-256), when it is given;
* an answer with ``tool_calls`` stands for its content followed by each call in the
  one form the entry node reads (and, under a grammar, constrains) them in:
  ``<tool_call>{"name": "<name>", "arguments": <arguments>}</tool_call>``
  (:func:`tool_call_text`), so its text is checked like any other.

The extension field, on the final JSON body or on the last SSE event (the one
with the receipts)::

    "teeshard": {"request_id": "<hex>", "completion_token_ids": [17, 402, 1]}

After a failover (the entry node rebuilt the session on another route), the
answer was produced by several route segments, and ``receipt_segments`` lists
them in order, each with the completion tokens ``[start, end)`` it produced::

    "receipt_segments": [{"tokens": [0, 5], "receipts": [...]},
                         {"tokens": [5, 12], "receipts": [...]}]

Each segment's chain must verify and start at layer 0; a segment that ended in
a fault may stop early (the lost node and those after it could not sign), and
then proves no tokens; every complete segment's last stage must have sent
exactly its slice of the token ids; the last segment is the ``receipts`` chain
and must be complete; every segment's stage 0 received the same request body.

A response with several choices (``n`` > 1, a list of prompts) carries these
fields in each choice object instead: every choice is its own session with its own
receipt chain, its request id is ``<the response's bare id>-<choice index>``, and
:func:`parse_choices` reads one claim per choice (each verified on its own; the
request body's ``n`` and prompts say which echo prefix each choice has).

Only the decoding is the caller's (the web console and the CLI bring their own
tokenizer); everything else here is pure and shared by both.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from teeshard.attest.entry_files import EntryFiles
from teeshard.attest.errors import FormatError, ReceiptError
from teeshard.attest.identity import cert_fingerprint, load_certificate
from teeshard.attest.receipts import (
    RECEIPTS_FIELD,
    ChainReport,
    Receipt,
    SignerInfo,
    TrafficHash,
    receipts_from_json,
    verify_chain,
)

EXTENSION_FIELD = "teeshard"
SEGMENTS_FIELD = "receipt_segments"
RESPONSE_ID_PREFIXES = ("chatcmpl-", "cmpl-")
Kind = Literal["chat", "completion", "generate"]
Decode = Callable[[Sequence[int]], str]


@dataclass(frozen=True)
class ClaimedSegment:
    """One route segment of an answer: completion tokens ``[token_start, token_end)``."""

    token_start: int
    token_end: int
    receipts: tuple[Receipt, ...]


@dataclass(frozen=True)
class ResponseClaims:
    """What a response says about itself: from a JSON body or an SSE transcript."""

    kind: Kind
    request_id: str
    response_id: str | None  # None for /generate
    text: str
    completion_token_ids: tuple[int, ...]
    finish_reason: str | None
    completion_tokens: int | None  # usage.completion_tokens, when the response has usage
    receipts: tuple[Receipt, ...]
    segments: tuple[ClaimedSegment, ...] = ()  # after a failover; () for one route
    choice_index: int | None = None  # one choice of several; None: a single-choice response


@dataclass(frozen=True)
class ResponseReport:
    chain: ChainReport  # of the route that finished the answer
    request_id: str
    completion_tokens: int
    text_checked: bool
    body_checked: bool
    segments: int = 1  # routes that produced parts of the answer
    partial_segments: int = 0  # of them, those whose chain stops at a lost node


def bare_request_id(value: str) -> str:
    """``chatcmpl-abc`` or ``cmpl-abc`` → ``abc``; any other id is returned as it is."""
    for prefix in RESPONSE_ID_PREFIXES:
        if value.startswith(prefix):
            return value[len(prefix) :]
    return value


def token_traffic_hash(token_ids: Iterable[int]) -> bytes:
    """The last stage's ``sent`` hash of a completion: one frame per returned token id."""
    hasher = TrafficHash()
    for token in token_ids:
        hasher.update(struct.pack("<I", token))
    return hasher.digest()


def response_extension(request_id: str, completion_token_ids: Sequence[int]) -> dict[str, Any]:
    """The extension field the entry node adds to a finished response."""
    return {"request_id": request_id, "completion_token_ids": list(completion_token_ids)}


TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


def tool_call_text(name: str, arguments: str) -> str:
    """The text a tool call was read from (``teeshard.entry.tools`` writes this form)."""
    return f'{TOOL_CALL_OPEN}{{"name": "{name}", "arguments": {arguments}}}{TOOL_CALL_CLOSE}'


# -- parsing -----------------------------------------------------------------------------


def parse_response(text: str | bytes) -> ResponseClaims:
    """A saved response: one JSON object, or a saved SSE stream (``data: {...}`` lines)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="strict")
    stripped = text.lstrip()
    if stripped.startswith("data:"):
        return _parse_stream(stripped)
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise FormatError(f"the response is neither JSON nor an SSE stream: {exc}") from None
    if not isinstance(body, dict):
        raise FormatError("the response is not a JSON object")
    if "choices" in body:
        choice = _first_choice(body)
        message = choice.get("message")
        kind: Kind = "chat" if isinstance(message, dict) else "completion"
        content = message.get("content") if isinstance(message, dict) else choice.get("text")
        text = _text(content)
        if isinstance(message, dict) and message.get("tool_calls"):
            text += _calls_text(message["tool_calls"], streamed=False)
        return _claims(body, kind, text, choice.get("finish_reason"), body)
    if "output" in body:
        return _claims(body, "generate", _text(body.get("output")), None, body)
    raise FormatError("the response has neither choices nor output")


def parse_choices(text: str | bytes) -> list[ResponseClaims]:
    """Every choice's claims: one for a single-choice response (``parse_response``), else
    one per choice, in index order, each from the receipt fields its choice carries."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="strict")
    stripped = text.lstrip()
    if stripped.startswith("data:"):
        events = _stream_events(stripped)
        items = [c for e in events for c in e.get("choices") or () if isinstance(c, dict)]
        if len({c.get("index") for c in items}) <= 1:
            return [_parse_stream(stripped)]
        return _multi(events[0], items, streamed=True)
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise FormatError(f"the response is neither JSON nor an SSE stream: {exc}") from None
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or len(choices) <= 1:
        return [parse_response(text)]
    return _multi(body, [c for c in choices if isinstance(c, dict)], streamed=False)


def _multi(
    body: dict[str, Any], items: list[dict[str, Any]], streamed: bool
) -> list[ResponseClaims]:
    by_index: dict[int, list[dict[str, Any]]] = {}
    for item in items:
        index = item.get("index")
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise FormatError("a choice has no index")
        by_index.setdefault(index, []).append(item)
    if sorted(by_index) != list(range(len(by_index))):
        raise FormatError("the choices' indexes are not 0, 1, 2...")
    out = []
    for index, parts in sorted(by_index.items()):
        chat = any(isinstance(p.get("message") or p.get("delta"), dict) for p in parts)
        texts = []
        for part in parts:
            holder = part.get("delta") if streamed else part.get("message")
            texts.append(
                _text(holder.get("content") if isinstance(holder, dict) else part.get("text"))
            )
        finish = next((p["finish_reason"] for p in parts if p.get("finish_reason")), None)
        sealed = [p for p in parts if EXTENSION_FIELD in p]
        if len(sealed) != 1:
            raise FormatError(f"choice {index} carries no receipts (or more than one set)")
        claims = _claims(body, "chat" if chat else "completion", "".join(texts), finish, sealed[0])
        out.append(replace(claims, choice_index=index, completion_tokens=None))
    return out


def _stream_events(text: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for line in text.splitlines():
        if not line.startswith("data:") or line[5:].strip() == "[DONE]":
            continue
        try:
            event = json.loads(line[5:])
        except ValueError:
            raise FormatError("an SSE event of the stream is not JSON") from None
        if not isinstance(event, dict):
            raise FormatError("an SSE event of the stream is not a JSON object")
        if "error" in event:
            raise ReceiptError(f"the stream ended with an error: {event['error']}")
        events.append(event)
    if not events:
        raise FormatError("the stream holds no events")
    return events


def _parse_stream(text: str) -> ResponseClaims:
    events = _stream_events(text)
    parts: list[str] = []
    calls: list[Any] = []  # tool call deltas, in order
    finish: object = None
    kind: Kind | None = None
    for event in events:
        if not event.get("choices"):
            continue
        choice = _first_choice(event)
        delta = choice.get("delta")
        if isinstance(delta, dict):
            kind = "chat"
            parts.append(_text(delta.get("content")))
            calls += delta.get("tool_calls") or []
        else:
            kind = "completion"
            parts.append(_text(choice.get("text")))
        finish = choice.get("finish_reason") or finish
    last = events[-1]
    text = "".join(parts) + (_calls_text(calls, streamed=True) if calls else "")
    return _claims(last, kind or "completion", text, finish, last)


def _calls_text(calls: object, streamed: bool) -> str:
    """The text ``tool_calls`` stand for; streamed: OpenAI's deltas (by index, the name
    on a call's first delta, its arguments in fragments)."""
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        raise FormatError("tool_calls: expected a list of objects")
    names: dict[int, str] = {}
    arguments: dict[int, list[str]] = {}
    for position, call in enumerate(calls):
        index = call.get("index") if streamed else position
        function = call.get("function")
        if not isinstance(index, int) or not isinstance(function, dict):
            raise FormatError("tool_calls: each call needs an index and a function")
        name = function.get("name")
        if name is not None:
            if not isinstance(name, str) or index in names:
                raise FormatError("tool_calls: a call is named once, with a string")
            names[index] = name
        arguments.setdefault(index, []).append(_text(function.get("arguments")))
    if sorted(arguments) != list(range(len(arguments))) or sorted(names) != sorted(arguments):
        raise FormatError("tool_calls: calls must be numbered from 0 and each named")
    return "".join(tool_call_text(names[i], "".join(arguments[i])) for i in sorted(arguments))


def _first_choice(body: dict[str, Any]) -> dict[str, Any]:
    choices = body.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        raise FormatError("expected exactly one choice (parse_choices reads several)")
    return choices[0]


def _text(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise FormatError("the response text is not a string")
    return value


def _claims(
    body: dict[str, Any], kind: Kind, text: str, finish: object, last: dict[str, Any]
) -> ResponseClaims:
    ext = last.get(EXTENSION_FIELD)
    if not isinstance(ext, dict):
        raise FormatError(
            f"the response has no {EXTENSION_FIELD!r} field: no completion token ids to check"
        )
    ids = ext.get("completion_token_ids")
    if not isinstance(ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 1 << 32 for t in ids
    ):
        raise FormatError(f"{EXTENSION_FIELD}.completion_token_ids: expected token ids")
    request_id = ext.get("request_id")
    if not isinstance(request_id, str):
        raise FormatError(f"{EXTENSION_FIELD}.request_id: expected a string")
    if RECEIPTS_FIELD not in last:
        raise FormatError("the response carries no receipts")
    usage = last.get("usage")
    completion_tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    response_id = body.get("id")
    return ResponseClaims(
        kind=kind,
        request_id=request_id,
        response_id=response_id if isinstance(response_id, str) else None,
        text=text,
        completion_token_ids=tuple(ids),
        finish_reason=finish if isinstance(finish, str) else None,
        completion_tokens=completion_tokens if isinstance(completion_tokens, int) else None,
        receipts=tuple(receipts_from_json(last)),
        segments=_segments(last.get(SEGMENTS_FIELD)),
    )


def _segments(value: object) -> tuple[ClaimedSegment, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        raise FormatError(f"{SEGMENTS_FIELD}: expected a list of segments")
    out = []
    for item in value:
        tokens = item.get("tokens") if isinstance(item, dict) else None
        if (
            not isinstance(tokens, list)
            or len(tokens) != 2
            or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens)
        ):
            raise FormatError(f"{SEGMENTS_FIELD}: each segment needs tokens [start, end]")
        assert isinstance(item, dict)
        out.append(ClaimedSegment(tokens[0], tokens[1], tuple(receipts_from_json(item))))
    return tuple(out)


@dataclass(frozen=True)
class RequestFacts:
    """What of the request body shapes the answer's text: stop sequences and echo."""

    stops: tuple[str, ...] = ()
    echo_prefix: str = ""
    echo_prefixes: tuple[str, ...] = ()  # echo with a list of prompts: each prompt's text
    n: int = 1

    def for_choice(self, index: int) -> RequestFacts:
        """The facts of choice ``index`` (of prompt ``index // n``)."""
        if not self.echo_prefixes:
            return self
        prompt = index // self.n
        if prompt >= len(self.echo_prefixes):
            raise ReceiptError(f"choice {index} has no prompt in the request body")
        return RequestFacts(self.stops, self.echo_prefixes[prompt], n=self.n)


def parse_request(body: bytes) -> RequestFacts:
    try:
        data = json.loads(body)
    except ValueError:
        raise FormatError("the request body is not JSON") from None
    if not isinstance(data, dict):
        raise FormatError("the request body is not a JSON object")
    stop = data.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(s for s in stop or () if isinstance(s, str))
    n = data.get("n")
    n = n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1
    prefixes: tuple[str, ...] = ()
    if data.get("echo") is True:
        prompt = data.get("prompt")
        prompts = prompt if isinstance(prompt, list) else [prompt]
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise FormatError("the request body's prompt is not a string")
        prefixes = tuple(str(p) for p in prompts)
    return RequestFacts(stops, prefixes[0] if prefixes else "", prefixes, n)


# -- the rules ---------------------------------------------------------------------------


def expected_text(full: str, facts: RequestFacts) -> str:
    """The text the entry node returns for a completion that decodes to ``full``."""
    full = full.rstrip("\ufffd")  # an unfinished UTF-8 character at the end is never sent
    cuts = [i for i in (full.find(s) for s in facts.stops) if i >= 0]
    return facts.echo_prefix + (full[: min(cuts)] if cuts else full)


def verify_response(
    claims: ResponseClaims,
    signers: Iterable[SignerInfo],
    *,
    entry_files: EntryFiles | None = None,
    decode: Decode | None = None,
    eos_token_ids: Collection[int] = (),
    request_body: bytes | None = None,
    request_id: str | None = None,
    num_layers: int | None = None,
) -> ResponseReport:
    """Check that the receipts prove this response to this request; ReceiptError if not.

    ``decode`` and ``entry_files`` come together (the tokenizer and its measured
    files, from the same checkpoint directory): without them the text is not
    checked, which the report says. ``request_id`` may be bare or prefixed.
    """
    if (decode is None) != (entry_files is None):
        raise ValueError("decode and entry_files come together, from one checkpoint directory")
    signers = list(signers)
    rid = claims.request_id
    # one choice of several: its session's id is the response's, then "-<index>"
    base = rid if claims.choice_index is None else rid.removesuffix(f"-{claims.choice_index}")
    if claims.choice_index is not None and base == rid:
        raise ReceiptError(f"choice {claims.choice_index}'s request id {rid!r} is not its own")
    if request_id is not None and bare_request_id(request_id) not in (rid, base):
        raise ReceiptError(
            f"the response is for request {rid!r}, not {bare_request_id(request_id)!r}"
        )
    if claims.response_id is not None and claims.response_id not in (
        f"{p}{base}" for p in RESPONSE_ID_PREFIXES
    ):
        raise ReceiptError(f"response id {claims.response_id!r} is not request {rid!r}")
    chain = verify_chain(claims.receipts, signers, request_id=rid, num_layers=num_layers)
    segments = claims.segments or (
        ClaimedSegment(0, len(claims.completion_token_ids), claims.receipts),
    )
    partial = _check_segments(claims, segments, signers, rid, num_layers)
    ids = list(claims.completion_token_ids)
    if ids and ids[-1] in eos_token_ids:
        ids.pop()  # the end-of-sequence token ends the answer; it is not text
    counts = {len(ids)}
    if not eos_token_ids and claims.finish_reason in ("stop", "tool_calls") and ids:
        counts.add(len(ids) - 1)  # EOS ids unknown (no tokenizer): the last may be one
    if claims.completion_tokens is not None and claims.completion_tokens not in counts:
        raise ReceiptError(
            f"usage says {claims.completion_tokens} completion tokens; the last stage sent {len(ids)}"
        )
    body_checked = False
    firsts = [s.receipts[0] for s in segments]
    if request_body is not None:
        body = hashlib.sha256(request_body).digest()
        if not all(hmac.compare_digest(f.received_sha256, body) for f in firsts):
            raise ReceiptError("stage 0 received another request body than the one given")
        body_checked = True
    if decode is not None and entry_files is not None:
        for first in firsts:
            _check_entry_files(first, signers, entry_files)
        facts = parse_request(request_body) if request_body is not None else RequestFacts()
        if claims.choice_index is not None:
            facts = facts.for_choice(claims.choice_index)
        full = decode(ids)
        want = expected_text(full, facts)
        if claims.text != want:
            if request_body is None and claims.text and full.startswith(claims.text):
                raise ReceiptError(
                    "the text is shorter than what the tokens decode to: give the request "
                    "body to check its stop sequences"
                )
            raise ReceiptError("the response text is not what its token ids decode to")
    return ResponseReport(
        chain, rid, len(ids), decode is not None, body_checked, len(segments), partial
    )


def _check_segments(
    claims: ResponseClaims,
    segments: Sequence[ClaimedSegment],
    signers: Sequence[SignerInfo],
    rid: str,
    num_layers: int | None,
) -> int:
    """Each segment's chain and token slice (see the module docstring); the partial count."""
    ids = claims.completion_token_ids
    if segments[-1].receipts != claims.receipts:
        raise ReceiptError(f"the last of {SEGMENTS_FIELD} is not the response's receipt chain")
    position, partial = 0, 0
    for index, segment in enumerate(segments):
        where = f"segment {index}"
        if segment.token_start != position or segment.token_end < segment.token_start:
            raise ReceiptError(f"{where} covers tokens out of order or with a gap")
        position = segment.token_end
        if not segment.receipts:
            raise ReceiptError(f"{where} carries no receipts")
        last = index == len(segments) - 1
        report = verify_chain(
            segment.receipts, signers, request_id=rid, num_layers=num_layers, complete=last
        )
        total = num_layers
        if total is None:
            total = _num_layers(segment.receipts[-1], signers)
        if report.layers.end != total:
            partial += 1  # stops at a lost node: it proves no tokens
            continue
        sent = token_traffic_hash(ids[segment.token_start : segment.token_end])
        if not hmac.compare_digest(segment.receipts[-1].sent_sha256, sent):
            said = f"{where}: " if len(segments) > 1 else ""
            raise ReceiptError(
                f"{said}the completion token ids are not the tokens the last stage sent"
            )
    if position != len(ids):
        raise ReceiptError(f"the segments cover {position} of {len(ids)} completion tokens")
    return partial


def _num_layers(receipt: Receipt, signers: Sequence[SignerInfo]) -> int | None:
    for signer in signers:
        if cert_fingerprint(load_certificate(signer.certificate_pem)) == receipt.signer:
            return signer.manifest.num_layers
    return None


def _check_entry_files(first: Receipt, signers: Sequence[SignerInfo], files: EntryFiles) -> None:
    for signer in signers:
        if cert_fingerprint(load_certificate(signer.certificate_pem)) != first.signer:
            continue
        attested = signer.manifest.entry
        if attested is None:
            raise ReceiptError("stage 0's manifest attests no tokenizer (no entry section)")
        if not hmac.compare_digest(attested.hash, files.hash):
            raise ReceiptError(
                f"the tokenizer files given (entry hash {files.hash.hex()[:16]}) are not the "
                f"attested ones ({attested.hash.hex()[:16]})"
            )
        return
    raise ReceiptError("stage 0 is signed by an unknown certificate")
