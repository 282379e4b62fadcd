# pragma version ~=0.4.3
"""
@title The events of TokenLedger: its journal
@notice Balance events (Deposited, Reserved, Settled, Released, Paid, Withdrawn,
        Refunded, and settlement.Claimed) replay every balance; node events
        (NodeRegistered with model, layers and bond, NodeAdmitted, NodeEdited,
        NodeRemoved, NodeEvicted, Served, Paid) rebuild the registry
        (teeshard.ledger.evm.events and .nodes read them).
"""

event AccountOpened:
    account: indexed(address)

event KeyBound:
    key_hash: indexed(bytes32)
    account: indexed(address)

event KeyUnbound:
    key_hash: indexed(bytes32)
    account: indexed(address)

event EntryAuthorised:
    entry: indexed(address)
    authorised: bool

event Deposited:
    account: indexed(address)
    payer: indexed(address)
    tokens: uint256
    value: uint256

event Reserved:
    request_id: indexed(bytes32)
    account: indexed(address)
    holder: indexed(address)
    amount: uint256
    request: String[128]

event Settled:
    request_id: indexed(bytes32)
    account: indexed(address)
    holder: indexed(address)
    amount: uint256
    cost: uint256

event Released:
    request_id: indexed(bytes32)
    account: indexed(address)
    caller: indexed(address)
    amount: uint256
    expired: bool

event Served:
    request_id: indexed(bytes32)
    node_id: indexed(bytes32)
    operator: indexed(address)
    tokens: uint256

event NodeRegistered:
    node_id: indexed(bytes32)
    operator: indexed(address)
    name: String[128]
    url: String[256]
    manifest_hash: bytes32
    model: String[128]
    layers: String[32]
    bond: uint256

event NodeAdmitted:
    node_id: indexed(bytes32)
    by: indexed(address)
    manifest_hash: bytes32

event NodeEdited:
    node_id: indexed(bytes32)
    operator: indexed(address)
    url: String[256]
    manifest_hash: bytes32
    admitted: bool

event NodeRemoved:
    node_id: indexed(bytes32)
    operator: indexed(address)
    bond: uint256  # returned to the operator in ETH

event NodeEvicted:
    node_id: indexed(bytes32)
    operator: indexed(address)
    by: indexed(address)
    bond: uint256  # forfeited to the pool

event Paid:
    node_id: indexed(bytes32)
    operator: indexed(address)
    epoch: indexed(uint256)
    amount: uint256
    tokens: uint256

event Distributed:
    epoch: indexed(uint256)
    pool_before: uint256
    distributed: uint256
    remainder: uint256
    tokens: uint256

event Withdrawn:
    operator: indexed(address)
    tokens: uint256
    value: uint256

event Refunded:
    account: indexed(address)
    tokens: uint256
    value: uint256

event RegistrationSet:
    bond: uint256
    admission_timeout: uint256
