"""Work credit: which admitted nodes a request's receipts prove served it, and their share.

Pure functions; the SQL ledger calls them inside ``settle``.

A request's cost is attributed to the nodes that served it, weighted by the
layers each ran: node *i* earns ``cost * layers_i // total_layers``, where
``total_layers`` is the end of the receipt chain (the whole model). Only a node
whose receipt verifies is credited: the receipt must be for this request, signed
by the certificate the node was admitted with, and carry the manifest hash and
layer range the node registered. The chain's structure (stage order, links,
contiguous layers from 0) is checked over every receipt; receipts of stages the
ledger does not know (the entry node itself, a node not admitted) cannot be
checked for a signature and earn nothing. What no verified node earns (their
layers, and the rounding) goes to the treasury at distribution, never to
another node: an entry node cannot credit more than a request paid, cannot
credit a node twice, and cannot credit a node that did not sign for the work.
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


def parse_layers(text: str) -> tuple[int, int] | None:
    start, sep, end = text.partition(":")
    if not sep or not start.isdigit() or not end.isdigit() or int(start) >= int(end):
        return None
    return int(start), int(end)


def verified_layers(
    request_id: str, receipts: Sequence[Receipt], signers: Mapping[bytes, AttestedSigner]
) -> tuple[dict[str, int], int]:
    """(node id -> layers it ran, proven by its signed receipt; layers of the whole chain).

    ``signers`` maps certificate SHA-256 (the receipt's ``signer``) to the node.
    Raises ``UnverifiedWork`` for a malformed chain or a receipt that a known
    signer did not make.
    """
    layers: dict[str, int] = {}
    previous: Receipt | None = None
    for index, receipt in enumerate(receipts):
        where = f"receipt {index}"
        if receipt.request_id != request_id:
            raise UnverifiedWork(f"{where} is for another request ({receipt.request_id!r})")
        link = previous.hash if previous is not None else ZERO_HASH
        if receipt.stage != index or not hmac.compare_digest(receipt.previous_hash, link):
            raise UnverifiedWork(f"{where} is out of order or not linked to the one before")
        start = previous.layers.end if previous is not None else 0
        if receipt.layers.start != start:
            raise UnverifiedWork(f"{where}: layers {receipt.layers} do not start at {start}")
        signer = signers.get(receipt.signer)
        if signer is not None:
            _check_signed(receipt, signer, where)
            if signer.node_id in layers:
                raise UnverifiedWork(f"{where}: node {signer.node_id!r} appears twice")
            layers[signer.node_id] = receipt.layers.end - receipt.layers.start
        previous = receipt
    total = previous.layers.end if previous is not None else 0
    return layers, total


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


def split_cost(cost: int, layers: Mapping[str, int], total_layers: int) -> list[Credit]:
    """Each node's share ``cost * layers // total``, rounded down; never more than ``cost``."""
    if cost <= 0 or total_layers <= 0:
        return []
    credited = sum(layers.values())
    if credited > total_layers:
        raise UnverifiedWork(f"{credited} layers credited of a {total_layers}-layer chain")
    return [
        Credit(node_id, n, cost * n // total_layers)
        for node_id, n in sorted(layers.items())
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
    layers, total = verified_layers(request_id, receipts, signers)
    wanted = set(served)
    return split_cost(cost, {n: k for n, k in layers.items() if n in wanted}, total)
