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
* stage 0 received exactly the request body (SHA-256), when it is given.

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
import struct
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from teeshard.attest.entry_files import EntryFiles
from teeshard.attest.errors import ReceiptError
from teeshard.attest.identity import cert_fingerprint, load_certificate
from teeshard.attest.receipts import (
    ChainReport,
    Receipt,
    SignerInfo,
    TrafficHash,
    verify_chain,
)
from teeshard.attest.response_claims import (
    EXTENSION_FIELD,
    RESPONSE_ID_PREFIXES,
    SEGMENTS_FIELD,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    ClaimedSegment,
    RequestFacts,
    ResponseClaims,
    bare_request_id,
    parse_choices,
    parse_request,
    parse_response,
    tool_call_text,
)

__all__ = [
    "EXTENSION_FIELD",
    "SEGMENTS_FIELD",
    "TOOL_CALL_CLOSE",
    "TOOL_CALL_OPEN",
    "ClaimedSegment",
    "Decode",
    "RequestFacts",
    "ResponseClaims",
    "ResponseReport",
    "bare_request_id",
    "expected_text",
    "parse_choices",
    "parse_request",
    "parse_response",
    "response_extension",
    "token_traffic_hash",
    "tool_call_text",
    "verify_response",
]

Decode = Callable[[Sequence[int]], str]


@dataclass(frozen=True)
class ResponseReport:
    chain: ChainReport  # of the route that finished the answer
    request_id: str
    completion_tokens: int
    text_checked: bool
    body_checked: bool
    segments: int = 1  # routes that produced parts of the answer
    partial_segments: int = 0  # of them, those whose chain stops at a lost node


def token_traffic_hash(token_ids: Iterable[int]) -> bytes:
    """The last stage's ``sent`` hash of a completion: one frame per returned token id."""
    hasher = TrafficHash()
    for token in token_ids:
        hasher.update(struct.pack("<I", token))
    return hasher.digest()


def response_extension(request_id: str, completion_token_ids: Sequence[int]) -> dict[str, Any]:
    """The extension field the entry node adds to a finished response."""
    return {"request_id": request_id, "completion_token_ids": list(completion_token_ids)}


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
