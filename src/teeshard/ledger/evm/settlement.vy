# pragma version ~=0.4.3
"""
@title Epoch settlement (a module of TokenLedger)
@notice Users' tokens for off-chain charging sit in the escrow. Each epoch a
        settler posts the Merkle root of the cumulative amount payable per
        account and the tree's total, which must be backed by what was ever
        escrowed; a claim with a proof pays what the account's cumulative
        amount adds to what it claimed before (so claims are idempotent), from
        the escrow and never past it, whatever trees a settler posts.
@dev    leaf = keccak256(0x00 || abi_encode(ledger, account, amount)), 97 bytes;
        parent = keccak256(sorted pair), 64 bytes: a leaf never passes for an
        inner node. teeshard.ledger.evm.merkle builds the same tree in Python.
"""

event SettlerAuthorised:
    settler: indexed(address)
    authorised: bool

event Escrowed:
    account: indexed(address)
    payer: indexed(address)
    tokens: uint256
    value: uint256

event EpochPosted:
    epoch: indexed(uint256)
    root: bytes32
    total: uint256
    by: indexed(address)

event Claimed:
    epoch: indexed(uint256)
    account: indexed(address)
    amount: uint256  # cumulative amount in the epoch's tree
    paid: uint256  # credited now (amount less what was claimed before)

settlers: public(HashMap[address, bool])
escrow: public(uint256)  # tokens deposited for off-chain charging, not yet claimed
escrow_deposited: public(uint256)  # ever
roots: public(HashMap[uint256, bytes32])  # settlement epoch -> Merkle root
epoch_totals: public(HashMap[uint256, uint256])  # settlement epoch -> sum of its amounts
epochs_posted: public(uint256)
claimed: public(HashMap[address, uint256])  # cumulative amount claimed per account


@internal
def _authorise(settler: address, authorised: bool):
    self.settlers[settler] = authorised
    log SettlerAuthorised(settler=settler, authorised=authorised)


@internal
def _deposit(account: address, tokens: uint256, paid_wei: uint256):
    self.escrow += tokens
    self.escrow_deposited += tokens
    log Escrowed(account=account, payer=msg.sender, tokens=tokens, value=paid_wei)


@internal
def _post(root: bytes32, total: uint256) -> uint256:
    assert root != empty(bytes32), "invalid_proof"
    assert total <= self.escrow_deposited, "insufficient_balance"
    epoch: uint256 = self.epochs_posted
    self.roots[epoch] = root
    self.epoch_totals[epoch] = total
    self.epochs_posted = epoch + 1
    log EpochPosted(epoch=epoch, root=root, total=total, by=msg.sender)
    return epoch


@pure
@internal
def _verify(proof: DynArray[bytes32, 32], root: bytes32, leaf: bytes32) -> bool:
    node: bytes32 = leaf
    for sibling: bytes32 in proof:
        if convert(node, uint256) < convert(sibling, uint256):
            node = keccak256(concat(node, sibling))
        else:
            node = keccak256(concat(sibling, node))
    return node == root


@internal
def _claim(epoch: uint256, account: address, amount: uint256, proof: DynArray[bytes32, 32]) -> uint256:
    """@return what to credit `account` now (0 when already claimed)."""
    root: bytes32 = self.roots[epoch]
    assert root != empty(bytes32), "unknown_epoch"
    leaf: bytes32 = keccak256(concat(b"\x00", abi_encode(self, account, amount)))
    assert amount <= self.epoch_totals[epoch] and self._verify(proof, root, leaf), "invalid_proof"
    already: uint256 = self.claimed[account]
    if amount <= already:
        return 0
    due: uint256 = amount - already
    assert due <= self.escrow, "insufficient_balance"
    self.claimed[account] = amount
    self.escrow -= due
    log Claimed(epoch=epoch, account=account, amount=amount, paid=due)
    return due
