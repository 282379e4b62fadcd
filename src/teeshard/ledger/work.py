"""Work credit: which admitted nodes a request's receipts prove served it, and their share.

Pure functions; the SQL ledger calls them inside ``settle``.

The receipts of a request are one or more *segments*, concatenated in order: a
segment is the receipt chain of one route that served part of the answer (more
than one after a failover; each starts with a stage-0 receipt). Every receipt
signs the token positions its stage ran in that session (``positions``, its KV
cache length) and the model's layer count (``model_layers``).

A node is credited for the work its segment added: its layers times the
positions its receipt signs (held to what the stages before it ran) beyond the
most positions any earlier segment reached, a segment reaching what its first
stage ran (a replacement route rebuilds the session by recomputing those, and
the request pays for them once). With ``L`` the model's layers and ``T`` the
most positions of any segment (the whole answer), node *i* earns
``cost * sum(layers_i * new_positions_i) // (L * T)``. Without a failover every
stage of the one segment ran all ``T`` positions, and a node earns
``cost * layers_i // L``.

Only a node whose receipt verifies is credited: the receipt must be for this
request, signed by the certificate the node was admitted with, and carry the
manifest hash and layer range the node registered. Each segment's structure
(stage order, links, contiguous layers from 0) is checked over every receipt,
and no stage is credited more positions than the stages before it ran (a step
that a hop gave up on, which the next node finished late, is no part of the
answer); receipts of stages
the ledger does not know (the entry node itself, a node not admitted) cannot be
checked for a signature and earn nothing. What no verified node earns (their
layers, and the rounding) goes to the treasury at distribution, never to
another node.

What an entry node cannot do: credit more than a request paid (for every layer
the credited positions over all segments add up to at most ``T``, and ``L`` is
the layer count the credited nodes signed, so a truncated chain does not raise
anyone's share); credit a node more positions than it signed for (a positions
count is part of the signed receipt); credit a node twice in one segment, or for
a replayed segment (it adds no positions beyond what was reached); invent a
segment (every credited receipt carries the node's signature for this request).
Positions are counted as shares of the answer's ``T``, never as amounts, so no
count can raise the total (a choice of ``n`` that shares its prompt runs more
positions than the completion tokens it reserved: that is fine). It can
withhold credit (leave a segment out): then the nodes of the next segment that
recomputed those positions are credited for them, never more than they signed.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from teeshard.attest.errors import AttestationError
from teeshard.attest.identity import load_certificate, verify_signature
from teeshard.attest.receipts import ZERO_HASH, Receipt
from teeshard.ledger.interface import UnverifiedWork


@dataclass(frozen=True)
class AttestedSigner:
    """An admitted node as the ledger knows it: its attested certificate and registration."""

    node_id: str
    certificate_pem: bytes
    manifest_hash: str  # hex
    layers: str  # "START:END" as registered


@dataclass(frozen=True)
class Credit:
    node_id: str
    layers: int  # layers this node ran for the request
    credit: int  # its share of the cost
    positions: int = 0  # token positions credited to it, over every segment it served


@dataclass(frozen=True)
class ProvenWork:
    """What a request's receipts prove: per node its layers and new positions, and the whole."""

    layers: Mapping[str, int]  # node id -> layers it ran
    positions: Mapping[str, int]  # node id -> positions it is credited for, all segments
    model_layers: int  # L
    total_positions: int  # T


def parse_layers(text: str) -> tuple[int, int] | None:
    start, sep, end = text.partition(":")
    if not sep or not start.isdigit() or not end.isdigit() or int(start) >= int(end):
        return None
    return int(start), int(end)


def segments_of(receipts: Sequence[Receipt]) -> list[Sequence[Receipt]]:
    """Split concatenated segments at each stage-0 receipt."""
    segments: list[list[Receipt]] = []
    for receipt in receipts:
        if receipt.stage == 0 or not segments:
            segments.append([])
        segments[-1].append(receipt)
    return list(segments)


def proven_work(
    request_id: str,
    receipts: Sequence[Receipt],
    signers: Mapping[bytes, AttestedSigner],
) -> ProvenWork:
    """The work the receipts prove (see the module docstring).

    ``signers`` maps certificate SHA-256 (the receipt's ``signer``) to the node.
    Raises ``UnverifiedWork`` for a malformed segment or a receipt that a known
    signer did not make.
    """
    layers: dict[str, int] = {}
    positions: dict[str, int] = {}
    stated: set[int] = set()
    reached, widest = 0, 0  # most positions of the segments so far; last layer seen
    for number, segment in enumerate(segments_of(receipts)):
        previous: Receipt | None = None
        in_segment: set[str] = set()
        sent = segment[0].positions  # the fewest positions of the stages so far
        for index, receipt in enumerate(segment):
            where = f"segment {number} receipt {index}"
            _check_link(receipt, previous, request_id, index, where)
            widest = max(widest, receipt.layers.end)
            signer = signers.get(receipt.signer)
            if signer is not None:
                _check_signed(receipt, signer, where)
                if signer.node_id in in_segment:
                    raise UnverifiedWork(f"{where}: node {signer.node_id!r} appears twice")
                in_segment.add(signer.node_id)
                if receipt.model_layers:
                    stated.add(receipt.model_layers)
                layers[signer.node_id] = receipt.layers.end - receipt.layers.start
                # never more than the stages before it ran (and so sent it): a step the
                # hop before gave up on is not part of the answer
                new = max(0, min(receipt.positions, sent) - reached)
                positions[signer.node_id] = positions.get(signer.node_id, 0) + new
            sent = min(sent, receipt.positions)
            previous = receipt
        reached = max(reached, segment[0].positions)  # what every stage's credit is held to
    if len(stated) > 1:
        raise UnverifiedWork(f"the credited receipts disagree on the model's layers: {stated}")
    # a credited receipt's layers end within the count it states (see _check_signed)
    model_layers = stated.pop() if stated else widest
    return ProvenWork(layers, positions, model_layers, reached)


def _check_link(
    receipt: Receipt, previous: Receipt | None, request_id: str, index: int, where: str
) -> None:
    if receipt.request_id != request_id:
        raise UnverifiedWork(f"{where} is for another request ({receipt.request_id!r})")
    link = previous.hash if previous is not None else ZERO_HASH
    if receipt.stage != index or not hmac.compare_digest(receipt.previous_hash, link):
        raise UnverifiedWork(f"{where} is out of order or not linked to the one before")
    start = previous.layers.end if previous is not None else 0
    if receipt.layers.start != start:
        raise UnverifiedWork(f"{where}: layers {receipt.layers} do not start at {start}")


def _check_signed(receipt: Receipt, signer: AttestedSigner, where: str) -> None:
    try:
        verify_signature(
            load_certificate(signer.certificate_pem), receipt.signature, receipt.signed_bytes()
        )
    except AttestationError:
        raise UnverifiedWork(
            f"{where} does not verify under node {signer.node_id!r}'s attested key"
        ) from None
    registered = parse_layers(signer.layers)
    got = (receipt.layers.start, receipt.layers.end)
    if receipt.manifest_hash.hex() != signer.manifest_hash or (registered and registered != got):
        raise UnverifiedWork(
            f"{where}: manifest or layers differ from node {signer.node_id!r}'s registration"
        )
    if receipt.model_layers and receipt.layers.end > receipt.model_layers:
        raise UnverifiedWork(
            f"{where}: layers {receipt.layers} of a {receipt.model_layers}-layer model"
        )


def split_cost(cost: int, work: ProvenWork, credited: Iterable[str] | None = None) -> list[Credit]:
    """Each node's share ``cost * layers * positions // (L * T)``; never more than ``cost``."""
    total = work.model_layers * work.total_positions
    if cost <= 0 or total <= 0:
        return []
    wanted = set(work.layers if credited is None else credited)
    units = {n: work.layers[n] * work.positions.get(n, 0) for n in work.layers if n in wanted}
    if sum(units.values()) > total:  # cannot happen for checked receipts: a guard
        raise UnverifiedWork(f"{sum(units.values())} layer-positions credited of {total}")
    return [
        Credit(node_id, work.layers[node_id], cost * n // total, work.positions.get(node_id, 0))
        for node_id, n in sorted(units.items())
        if n > 0
    ]


def credits_for(
    request_id: str,
    cost: int,
    served: Iterable[str],
    receipts: Sequence[Receipt],
    signers: Mapping[bytes, AttestedSigner],
) -> list[Credit]:
    """The credits of a settle: nodes named in ``served`` whose receipts verify."""
    return split_cost(cost, proven_work(request_id, receipts, signers), served)
