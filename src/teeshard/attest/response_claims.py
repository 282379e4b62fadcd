"""Reading a response's claims: what a saved JSON body or SSE transcript says about
itself (its text, completion token ids, receipts, segments; one claim per choice), and
what of the request body shapes its text. Pure; the rules are ``response``'s.

An answer with ``tool_calls`` stands for its content followed by each call in the one
form the entry node reads (and, under a grammar, constrains) them in,
``<tool_call>{"name": "<name>", "arguments": <arguments>}</tool_call>``
(:func:`tool_call_text`): its text is checked against the token ids like any other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Literal

from teeshard.attest.errors import FormatError, ReceiptError
from teeshard.attest.receipts import RECEIPTS_FIELD, Receipt, receipts_from_json

EXTENSION_FIELD = "teeshard"
SEGMENTS_FIELD = "receipt_segments"
RESPONSE_ID_PREFIXES = ("chatcmpl-", "cmpl-")
Kind = Literal["chat", "completion", "generate"]
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


def tool_call_text(name: str, arguments: str) -> str:
    """The text a tool call was read from (``teeshard.entry.tools`` writes this form)."""
    return f'{TOOL_CALL_OPEN}{{"name": "{name}", "arguments": {arguments}}}{TOOL_CALL_CLOSE}'


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


def bare_request_id(value: str) -> str:
    """``chatcmpl-abc`` or ``cmpl-abc`` → ``abc``; any other id is returned as it is."""
    for prefix in RESPONSE_ID_PREFIXES:
        if value.startswith(prefix):
            return value[len(prefix) :]
    return value


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
        text = _text(content) + _calls_text([message], streamed=False)
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
        holders = []
        for part in parts:
            holder = part.get("delta") if streamed else part.get("message")
            holders.append(holder)
            texts.append(
                _text(holder.get("content") if isinstance(holder, dict) else part.get("text"))
            )
        texts.append(_calls_text(holders, streamed))
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
    deltas: list[object] = []
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
            deltas.append(delta)
        else:
            kind = "completion"
            parts.append(_text(choice.get("text")))
        finish = choice.get("finish_reason") or finish
    last = events[-1]
    text = "".join(parts) + _calls_text(deltas, streamed=True)
    return _claims(last, kind or "completion", text, finish, last)


def _calls_text(holders: list[object], streamed: bool) -> str:
    """The text the ``tool_calls`` of a choice's messages (or, streamed, its deltas:
    OpenAI's, by index, the name on a call's first delta, arguments in fragments)
    stand for; "" when there are none."""
    calls: list[object] = []
    for holder in holders:
        if isinstance(holder, dict) and holder.get("tool_calls") is not None:
            found = holder["tool_calls"]
            if not isinstance(found, list):
                raise FormatError("tool_calls: expected a list")
            calls += found
    names: dict[int, str] = {}
    arguments: dict[int, list[str]] = {}
    for position, call in enumerate(calls):
        index = call.get("index") if streamed and isinstance(call, dict) else position
        function = call.get("function") if isinstance(call, dict) else None
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
