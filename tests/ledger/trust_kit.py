"""What the trust tests need: nodes with real attested-key types, their claims and receipts.

``KitNode`` holds a real ``NodeIdentity`` (an EC P-256 key and certificate, as a
node makes inside its TEE; here without a quote: the ledger checks claims and
receipts by the certificate an entry node verified, which is what these tests
exercise; tests/ledger/test_ledger_registration.py runs the same flow against
real attested nodes).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from ledger_harness import World

from teeshard.attest.identity import NodeIdentity
from teeshard.attest.receipts import Receipt, sign_receipt
from teeshard.ledger.claims import AttestedNode, OperatorClaim, sign_claim
from teeshard.ledger.interface import Ledger, NodeInfo
from teeshard.model.layer_range import LayerRange


@dataclass
class KitNode:
    node_id: str
    manifest: str  # hex
    layers: LayerRange
    identity: NodeIdentity = field(default_factory=NodeIdentity.generate)

    @property
    def url(self) -> str:
        return f"http://{self.node_id}:8000"

    def info(self) -> NodeInfo:
        return NodeInfo(self.node_id, self.url, self.manifest, "m", str(self.layers))

    def claim(self, operator: str, ledger: Ledger, nonce: bytes | None = None) -> OperatorClaim:
        return sign_claim(
            self.identity, operator, self.node_id, ledger.ledger_id(), nonce or os.urandom(32)
        )

    def attested(self, operator: str, ledger: Ledger) -> AttestedNode:
        return AttestedNode(self.url, self.claim(operator, ledger))


def admitted(
    world: World, node_id: str = "node-a", manifest: str = "a" * 64, layers: str = "1:2"
) -> tuple[str, Ledger, KitNode]:
    """A node registered with its claim by a new operator and admitted by the owner."""
    start, _, end = layers.partition(":")
    node = KitNode(node_id, manifest, LayerRange(int(start), int(end)))
    operator, as_operator = world.new_account()
    as_operator.register_node(node.info(), claim=node.claim(operator, as_operator))
    world.owner.admit_node(node_id, manifest, attested=node.attested(operator, world.owner))
    return operator, as_operator, node


def entry_stage(layers: LayerRange) -> KitNode:
    """The entry node's own stage (not a registered node)."""
    return KitNode("entry", "e" * 64, layers)


def chain(
    request_id: str,
    stages: Sequence[KitNode],
    positions: int | Sequence[int] = 10,
    model_layers: int | None = None,
) -> list[Receipt]:
    """The receipts a request served by ``stages`` (in order) comes back with.

    ``positions``: the token positions each stage ran (one count for all, or one each);
    ``model_layers``: the model's layer count (default: where the last stage ends).
    """
    receipts: list[Receipt] = []
    data = hashlib.sha256(request_id.encode()).digest()
    counts = [positions] * len(stages) if isinstance(positions, int) else list(positions)
    layers = model_layers if model_layers is not None else stages[-1].layers.end
    for index, stage in enumerate(stages):
        sent = hashlib.sha256(data + bytes([index])).digest()
        receipts.append(
            sign_receipt(
                stage.identity,
                request_id=request_id,
                stage=index,
                layers=stage.layers,
                model_layers=layers,
                positions=counts[index],
                manifest_hash=bytes.fromhex(stage.manifest),
                received_sha256=data,
                sent_sha256=sent,
                previous=receipts[-1] if receipts else None,
            )
        )
        data = sent
    return receipts
