"""Receipt chains: any altered field, reordering, dropped stage or foreign key fails."""

from __future__ import annotations

import dataclasses
import json

import pytest

from teeshard.attest.attester import NodeAttestation
from teeshard.attest.errors import FormatError, ReceiptError
from teeshard.attest.evidence import Bundle
from teeshard.attest.manifest import ShardManifest
from teeshard.attest.receipts import (
    ZERO_HASH,
    Receipt,
    TrafficHash,
    chain_digest,
    load_receipts,
    receipts_to_json,
    verify_chain,
)
from teeshard.model.layer_range import LayerRange
from tests.attest.helpers import NodeFactory

REQUEST = "req-42"


def traffic(*frames: bytes) -> bytes:
    hasher = TrafficHash()
    for frame in frames:
        hasher.update(frame)
    return hasher.digest()


@pytest.fixture
def pipeline(
    make_node: NodeFactory, manifests: dict[str, ShardManifest]
) -> tuple[list[NodeAttestation], list[Bundle], list[Receipt]]:
    """Two stages: 0:2 gets token ids and sends hidden states; 2:3 sends back a token id."""
    nodes = [make_node(manifests["0:2"]), make_node(manifests["2:3"])]
    bundles = [n.bundle(bytes(16)) for n in nodes]
    hidden = traffic(b"hidden-state-prefill", b"hidden-state-step")
    first = nodes[0].sign_receipt(
        request_id=REQUEST, stage=0, received_sha256=traffic(b"token ids"),
        sent_sha256=hidden, positions=12, previous=None,
    )  # fmt: skip
    second = nodes[1].sign_receipt(
        request_id=REQUEST, stage=1, received_sha256=hidden,
        sent_sha256=traffic(b"token 7", b"token 9"), positions=12, previous=first,
    )  # fmt: skip
    return nodes, bundles, [first, second]


def test_a_good_chain_verifies(pipeline: tuple[list, list[Bundle], list[Receipt]]) -> None:
    _, bundles, receipts = pipeline
    report = verify_chain(receipts, bundles, request_id=REQUEST)
    assert report.stages == 2 and report.layers == LayerRange(0, 3)
    assert report.digest == chain_digest(receipts)
    assert receipts[0].previous_hash == ZERO_HASH
    assert receipts[1].previous_hash == receipts[0].hash


FIELD_CHANGES = {
    "request_id": "req-43",
    "stage": 5,
    "layers": LayerRange(0, 1),
    "model_layers": 7,
    "positions": 11,
    "manifest_hash": b"\x01" * 32,
    "received_sha256": b"\x02" * 32,
    "sent_sha256": b"\x03" * 32,
    "previous_hash": b"\x04" * 32,
    "signer": b"\x05" * 32,
    "signature": b"\x30\x06\x02\x01\x01\x02\x01\x01",
}


def test_every_field_is_covered() -> None:
    assert set(FIELD_CHANGES) == {f.name for f in dataclasses.fields(Receipt)}


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("field", sorted(FIELD_CHANGES))
def test_altering_any_field_of_any_receipt_fails(
    pipeline: tuple[list, list[Bundle], list[Receipt]], index: int, field: str
) -> None:
    _, bundles, receipts = pipeline
    altered = list(receipts)
    altered[index] = dataclasses.replace(receipts[index], **{field: FIELD_CHANGES[field]})
    with pytest.raises(ReceiptError):
        verify_chain(altered, bundles, request_id=REQUEST)


def test_a_flipped_signature_bit_fails(pipeline: tuple[list, list[Bundle], list[Receipt]]) -> None:
    _, bundles, receipts = pipeline
    signature = bytearray(receipts[1].signature)
    signature[-3] ^= 0x10
    altered = [receipts[0], dataclasses.replace(receipts[1], signature=bytes(signature))]
    with pytest.raises(ReceiptError, match="signature"):
        verify_chain(altered, bundles)


def test_reordering_or_dropping_stages_fails(
    pipeline: tuple[list, list[Bundle], list[Receipt]],
) -> None:
    _, bundles, receipts = pipeline
    with pytest.raises(ReceiptError, match="stage"):
        verify_chain(list(reversed(receipts)), bundles)
    with pytest.raises(ReceiptError, match="stage"):
        verify_chain(receipts[1:], bundles)  # first stage dropped
    with pytest.raises(ReceiptError, match="stage missing"):
        verify_chain(receipts[:1], bundles)  # last stage dropped
    with pytest.raises(ReceiptError, match="empty"):
        verify_chain([], bundles)
    with pytest.raises(ReceiptError, match="request"):
        verify_chain(receipts, bundles, request_id="other")


def test_unknown_or_swapped_signers_fail(
    pipeline: tuple[list[NodeAttestation], list[Bundle], list[Receipt]],
    make_node: NodeFactory,
    manifests: dict[str, ShardManifest],
) -> None:
    nodes, bundles, receipts = pipeline
    with pytest.raises(ReceiptError, match="unknown certificate"):
        verify_chain(receipts, bundles[:1])
    # An impostor with the right manifest but another key signs stage 1.
    impostor = make_node(manifests["2:3"])
    forged = impostor.sign_receipt(
        request_id=REQUEST, stage=1, received_sha256=receipts[1].received_sha256,
        sent_sha256=receipts[1].sent_sha256, positions=12, previous=receipts[0],
    )  # fmt: skip
    with pytest.raises(ReceiptError, match="unknown certificate"):
        verify_chain([receipts[0], forged], bundles)
    # Stage 1 signed by the node of stage 0 (wrong manifest for those layers).
    wrong = nodes[0].sign_receipt(
        request_id=REQUEST, stage=1, received_sha256=receipts[1].received_sha256,
        sent_sha256=receipts[1].sent_sha256, positions=12, previous=receipts[0], layers=LayerRange(2, 3),
    )  # fmt: skip
    with pytest.raises(ReceiptError, match="manifest or layers"):
        verify_chain([receipts[0], wrong], bundles)


def test_data_links_between_stages(
    pipeline: tuple[list[NodeAttestation], list[Bundle], list[Receipt]],
) -> None:
    nodes, bundles, receipts = pipeline
    other_input = nodes[1].sign_receipt(
        request_id=REQUEST, stage=1, received_sha256=traffic(b"something else"),
        sent_sha256=receipts[1].sent_sha256, positions=12, previous=receipts[0],
    )  # fmt: skip
    with pytest.raises(ReceiptError, match="received data differs"):
        verify_chain([receipts[0], other_input], bundles)
    assert verify_chain([receipts[0], other_input], bundles, check_data_links=False).stages == 2


def test_signing_refuses_a_bad_previous(
    pipeline: tuple[list[NodeAttestation], list[Bundle], list[Receipt]],
) -> None:
    nodes, _, receipts = pipeline
    common = {"received_sha256": ZERO_HASH, "sent_sha256": ZERO_HASH, "positions": 1}
    with pytest.raises(ReceiptError):
        nodes[1].sign_receipt(request_id=REQUEST, stage=1, previous=None, **common)
    with pytest.raises(ReceiptError):
        nodes[0].sign_receipt(request_id=REQUEST, stage=0, previous=receipts[0], **common)
    with pytest.raises(ReceiptError):
        nodes[1].sign_receipt(request_id="x", stage=1, previous=receipts[0], **common)


def test_json_round_trip(pipeline: tuple[list, list[Bundle], list[Receipt]]) -> None:
    receipts = pipeline[2]
    as_list = json.dumps(receipts_to_json(receipts))
    assert load_receipts(as_list) == receipts
    response = json.dumps({"choices": [], "receipts": receipts_to_json(receipts)})
    assert load_receipts(response) == receipts
    with pytest.raises(FormatError, match="unknown field"):
        load_receipts(json.dumps([{**receipts[0].to_json(), "prompt": "hi"}]))
    with pytest.raises(FormatError, match="no 'receipts'"):
        load_receipts("{}")


def test_traffic_hash_frames_are_unambiguous() -> None:
    assert traffic(b"ab", b"c") != traffic(b"a", b"bc")
    assert traffic(b"ab") != traffic(b"ab", b"")
