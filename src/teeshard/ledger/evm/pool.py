"""Nodes and the pool on chain: registration with a bond, admission, eviction, payouts.

A registration pays ``registration_bond`` tokens in ETH (the contract's
setting); removing the node returns the bond to its operator, while a node
left unadmitted for ``admission_timeout`` may be evicted by anyone, its bond
forfeited to the pool. A junk-registration spammer thus pays for every slot it
holds and loses it after the timeout, and honest operators always find room.
"""

from __future__ import annotations

from teeshard.ledger.claims import AttestedNode, OperatorClaim, verify_claim
from teeshard.ledger.evm import events
from teeshard.ledger.evm.contract import ContractClient, chain_id_of
from teeshard.ledger.interface import (
    ClaimRefused,
    Distribution,
    InvalidAmount,
    JournalEntry,
    NodeInfo,
    NodeRecord,
    UnknownNode,
    check_amount,
    check_manifest_hash,
    check_node_info,
)


class NodePool(ContractClient):
    def _node(self, node_id: str) -> NodeRecord | None:
        row = self._call("nodes", chain_id_of(node_id))
        operator, name, url, manifest, model, layers, admitted, removed = row[:8]
        served, total = row[9], row[10]
        if int(operator, 16) == 0 or removed:
            return None
        return NodeRecord(
            name,
            str(operator),
            url,
            bytes(manifest).hex(),
            model,
            layers,
            bool(admitted),
            int(served),
            int(total),
        )

    def _require_node(self, node_id: str) -> NodeRecord:
        record = self._node(node_id)
        if record is None:
            raise UnknownNode(f"no registered node {node_id!r}")
        return record

    def register_node(self, node: NodeInfo, *, claim: OperatorClaim | None = None) -> NodeRecord:
        node = check_node_info(node)
        if claim is not None:  # the contract cannot check P-256 signatures; this client does
            verify_claim(claim, operator=self.actor, node_id=node.node_id, ledger_id=self.address)
        bond = int(self._call("registration_bond"))
        self._transact(
            "register_node",
            node.node_id,
            node.url,
            bytes.fromhex(node.manifest_hash),
            node.model,
            node.layers,
            value=bond * self.wei_per_token(),
            messages={
                "unknown_account": f"operator {self.actor} has no account; open one first",
                "duplicate_node": f"node {node.node_id!r} is already registered "
                "(or was removed with work not yet distributed)",
                "too_many_nodes": "the pool is full; evict nodes left unadmitted "
                "(evict_node) or distribute to drop removed ones",
                "invalid_bond": f"registration takes a bond of {bond} tokens",
            },
        )
        return self._require_node(node.node_id)

    def admit_node(
        self, node_id: str, manifest_hash: str, *, attested: AttestedNode | None = None
    ) -> NodeRecord:
        manifest_hash = check_manifest_hash(manifest_hash)
        registered = self._require_node(node_id)
        if attested is not None:  # the admitting entry node checks the claim, off chain
            if attested.url.rstrip("/") != registered.url.rstrip("/"):
                raise ClaimRefused(
                    f"the URL verified ({attested.url}) is not the registered {registered.url}"
                )
            verify_claim(
                attested.claim, operator=registered.operator, node_id=node_id,
                ledger_id=self.address,
            )  # fmt: skip
        self._transact(
            "admit_node",
            chain_id_of(node_id),
            bytes.fromhex(manifest_hash),
            messages={
                "unauthorized": f"{self.actor} is neither an entry node nor the owner: it may not admit nodes",
                "manifest_mismatch": f"node {node_id!r} registered manifest "
                f"{registered.manifest_hash}, but its attestation shows {manifest_hash}: not admitted",
            },
        )
        return self._require_node(node_id)

    def edit_node(
        self, node_id: str, *, url: str | None = None, manifest_hash: str | None = None
    ) -> NodeRecord:
        current = self._require_node(node_id)
        checked = check_node_info(
            NodeInfo(node_id, url or current.url, manifest_hash or current.manifest_hash)
        )
        self._transact(
            "edit_node",
            chain_id_of(node_id),
            checked.url,
            bytes.fromhex(checked.manifest_hash),
            messages={
                "unauthorized": f"only node {node_id!r}'s operator ({current.operator}) may edit it"
            },
        )
        return self._require_node(node_id)

    def remove_node(self, node_id: str) -> None:
        current = self._require_node(node_id)
        self._transact(
            "remove_node",
            chain_id_of(node_id),
            messages={
                "unauthorized": f"only node {node_id!r}'s operator ({current.operator}) may remove it"
            },
        )

    def evict_node(self, node_id: str) -> int:
        """Evict a node left unadmitted past the timeout (anyone may); the bond it forfeited."""
        self._require_node(node_id)
        timeout = int(self._call("admission_timeout"))
        receipt = self._transact(
            "evict_node",
            chain_id_of(node_id),
            messages={
                "too_early": f"node {node_id!r} may be evicted only once it has waited "
                f"{timeout} s unadmitted",
                "node_admitted": f"node {node_id!r} is admitted (or has work not yet "
                "distributed): it cannot be evicted",
            },
        )
        (log,) = self.contract.events.NodeEvicted().process_receipt(receipt)
        return int(log["args"]["bond"])

    def nodes(self) -> list[NodeRecord]:
        count = int(self._call("node_count"))
        found = []
        for index in range(count):
            node_key = self._call("node_ids", index)
            name = self._call("nodes", node_key)[1]
            record = self._node(name)
            if record is not None:
                found.append(record)
        return sorted(found, key=lambda n: n.node_id)

    def is_operator(self, account: str) -> bool:
        return bool(self._call("is_operator", self._address(account)))

    def pool(self) -> int:
        return int(self._call("pool"))

    def distribute(self) -> Distribution:
        receipt = self._transact("distribute")
        return events.distribution_from_receipt(self, receipt)

    def withdraw(self, amount: int | None = None) -> JournalEntry:
        earnings = int(self._call("earnings", self.actor))
        if amount is None:
            if earnings == 0:
                raise InvalidAmount(f"{self.actor} has no earnings to withdraw")
            amount = earnings
        check_amount(amount, "withdrawal")
        receipt = self._transact(
            "withdraw",
            amount,
            messages={
                "insufficient_earnings": f"{self.actor} has {earnings} in earnings; cannot withdraw {amount}"
            },
        )
        return events.entries_from_receipt(self, receipt, self.actor)[0]
