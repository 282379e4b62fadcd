# pragma version ~=0.4.3
# pragma evm-version cancun
"""
@title teeshard token ledger and contribution pool
@notice Users buy tokens with ETH at a fixed wei price and spend them on
        inference. Authorised entry nodes reserve the most a request can cost
        before generating, then settle the real cost (naming the nodes that
        served it) or release it. Settled costs go to the pool; `distribute`
        splits the pool among node operators in proportion to the tokens their
        nodes served since the last distribution; operators withdraw ETH, and
        users take unspent deposits back (`refund`). Epoch settlement, the
        recommended path, charges off chain: see settlement.vy. Registration
        takes a bond; unadmitted nodes may be evicted after a timeout.
@dev    Rounding: each node's share is floor(pool * served / total); what is
        left stays in `pool` for the next distribution, so no wei is ever lost
        or stuck. Every external function that changes state is nonreentrant
        (one transient-storage lock, cheap on cancun) and `withdraw` follows
        checks-effects-interactions. Revert reasons are short codes that the
        Python client maps to its exception tree.
"""

import journal
import ownable
import settlement

initializes: ownable
initializes: settlement

exports: (
    ownable.owner,
    ownable.pending_owner,
    ownable.transfer_ownership,
    ownable.accept_ownership,
    settlement.settlers,
    settlement.escrow,
    settlement.escrow_deposited,
    settlement.roots,
    settlement.epoch_totals,
    settlement.epochs_posted,
    settlement.claimed,
)

MAX_NODES: constant(uint256) = 128  # registered (and removed, until the next distribution)
MAX_SERVED: constant(uint256) = 16  # nodes named by one settlement

UNUSED: constant(uint8) = 0
RESERVED: constant(uint8) = 1
SETTLED: constant(uint8) = 2
RELEASED: constant(uint8) = 3

struct Reservation:
    account: address
    amount: uint256
    holder: address
    created: uint256
    state: uint8
    cost: uint256

struct Node:
    operator: address
    name: String[128]
    url: String[256]
    manifest_hash: bytes32
    model: String[128]
    layers: String[32]
    admitted: bool
    removed: bool
    listed: bool  # present in node_ids
    served: uint256  # tokens since the last distribution
    served_total: uint256
    bond: uint256  # tokens held while registered
    since: uint256  # registered, or admission lapsed: the eviction clock starts
    index: uint256  # position in node_ids while listed

wei_per_token: public(uint256)
reservation_timeout: public(uint256)  # seconds after which anyone may release a reservation
entries: public(HashMap[address, bool])
known: public(HashMap[address, bool])
available: public(HashMap[address, uint256])
reserved: public(HashMap[address, uint256])
earnings: public(HashMap[address, uint256])
key_owner: public(HashMap[bytes32, address])
pool: public(uint256)
reservations: public(HashMap[bytes32, Reservation])
nodes: public(HashMap[bytes32, Node])
node_ids: public(DynArray[bytes32, MAX_NODES])
operator_nodes: public(HashMap[address, uint256])  # admitted, not removed
total_served: public(uint256)  # since the last distribution
total_deposited: public(uint256)  # tokens
total_withdrawn: public(uint256)  # tokens
epoch: public(uint256)
registration_bond: public(uint256)  # tokens paid in ETH with each registration
admission_timeout: public(uint256)  # seconds a registered node may wait to be admitted
bonded: public(uint256)  # bonds held


@deploy
def __init__(
    wei_per_token: uint256,
    reservation_timeout: uint256,
    registration_bond: uint256,
    admission_timeout: uint256,
):
    assert wei_per_token > 0, "invalid_amount"
    ownable.__init__()
    self.wei_per_token = wei_per_token
    self.reservation_timeout = reservation_timeout
    self.registration_bond = registration_bond
    self.admission_timeout = admission_timeout



@external
@nonreentrant
def set_registration(bond: uint256, admission_timeout: uint256):
    ownable._check_owner()
    self.registration_bond = bond
    self.admission_timeout = admission_timeout
    log journal.RegistrationSet(bond=bond, admission_timeout=admission_timeout)


@external
@nonreentrant
def authorize_settler(settler: address, authorised: bool):
    ownable._check_owner()
    settlement._authorise(settler, authorised)


@external
@nonreentrant
def authorize_entry(entry: address, authorised: bool):
    ownable._check_owner()
    self.entries[entry] = authorised
    log journal.EntryAuthorised(entry=entry, authorised=authorised)


@internal
def _open(account: address):
    if not self.known[account]:
        self.known[account] = True
        log journal.AccountOpened(account=account)


@external
@nonreentrant
def open_account():
    self._open(msg.sender)


@external
@nonreentrant
def bind_key(key_hash: bytes32):
    """@notice Let an API key (by its hash) spend from the caller's account."""
    assert self.key_owner[key_hash] == empty(address), "duplicate_key"
    self._open(msg.sender)
    self.key_owner[key_hash] = msg.sender
    log journal.KeyBound(key_hash=key_hash, account=msg.sender)


@external
@nonreentrant
def unbind_key(key_hash: bytes32):
    assert self.key_owner[key_hash] == msg.sender, "unauthorized"
    self.key_owner[key_hash] = empty(address)
    log journal.KeyUnbound(key_hash=key_hash, account=msg.sender)


@external
@payable
@nonreentrant
def deposit(account: address):
    """@notice Buy tokens for `account` (an opened account) at `wei_per_token`."""
    assert msg.value > 0 and msg.value % self.wei_per_token == 0, "invalid_amount"
    assert self.known[account], "unknown_account"
    tokens: uint256 = msg.value // self.wei_per_token
    self.available[account] += tokens
    self.total_deposited += tokens
    log journal.Deposited(account=account, payer=msg.sender, tokens=tokens, value=msg.value)


@external
@nonreentrant
def refund(amount: uint256):
    """@notice Pay `amount` of the caller's unspent (available) tokens back in ETH."""
    assert amount > 0, "invalid_amount"
    assert self.available[msg.sender] >= amount, "insufficient_balance"
    self.available[msg.sender] -= amount
    self.total_withdrawn += amount
    value: uint256 = amount * self.wei_per_token
    log journal.Refunded(account=msg.sender, tokens=amount, value=value)
    raw_call(msg.sender, b"", value=value)



@external
@nonreentrant
def reserve(request_id: bytes32, account: address, amount: uint256, request: String[128]):
    assert self.entries[msg.sender], "unauthorized"
    assert amount > 0, "invalid_amount"
    assert self.known[account], "unknown_account"
    assert self.reservations[request_id].state == UNUSED, "duplicate_request"
    assert self.available[account] >= amount, "insufficient_balance"
    self.available[account] -= amount
    self.reserved[account] += amount
    self.reservations[request_id] = Reservation(
        account=account,
        amount=amount,
        holder=msg.sender,
        created=block.timestamp,
        state=RESERVED,
        cost=0,
    )
    log journal.Reserved(
        request_id=request_id, account=account, holder=msg.sender, amount=amount, request=request
    )


@external
@nonreentrant
def settle(
    request_id: bytes32,
    cost: uint256,
    node_ids: DynArray[bytes32, MAX_SERVED],
    tokens: DynArray[uint256, MAX_SERVED],
):
    r: Reservation = self.reservations[request_id]
    assert r.state != UNUSED, "unknown_request"
    assert self.entries[msg.sender] and r.holder == msg.sender, "unauthorized"
    assert r.state != RELEASED, "reservation_closed"
    if r.state == SETTLED:
        assert r.cost == cost, "duplicate_request"
        return  # a replayed settlement charges and credits nothing more
    assert cost <= r.amount, "invalid_amount"
    assert len(node_ids) == len(tokens), "invalid_amount"
    for i: uint256 in range(len(node_ids), bound=MAX_SERVED):
        node_id: bytes32 = node_ids[i]
        served: uint256 = tokens[i]
        assert served > 0, "invalid_amount"
        assert self.nodes[node_id].admitted, "unknown_node"
        self.nodes[node_id].served += served
        self.nodes[node_id].served_total += served
        self.total_served += served
        log journal.Served(
            request_id=request_id,
            node_id=node_id,
            operator=self.nodes[node_id].operator,
            tokens=served,
        )
    self.reserved[r.account] -= r.amount
    self.available[r.account] += r.amount - cost
    self.pool += cost
    self.reservations[request_id].state = SETTLED
    self.reservations[request_id].cost = cost
    log journal.Settled(
        request_id=request_id, account=r.account, holder=msg.sender, amount=r.amount, cost=cost
    )


@external
@nonreentrant
def release(request_id: bytes32):
    """@notice The holder may release at any time; anyone may once it is older than the timeout."""
    r: Reservation = self.reservations[request_id]
    assert r.state != UNUSED, "unknown_request"
    if r.state == RELEASED:
        return
    assert r.state == RESERVED, "reservation_closed"
    expired: bool = block.timestamp >= r.created + self.reservation_timeout
    assert msg.sender == r.holder or expired, "unauthorized"
    self.reserved[r.account] -= r.amount
    self.available[r.account] += r.amount
    self.reservations[request_id].state = RELEASED
    log journal.Released(
        request_id=request_id, account=r.account, caller=msg.sender, amount=r.amount, expired=expired
    )



@internal
def _unlist(node_id: bytes32):
    """Swap-remove from node_ids: the slot is free at once."""
    index: uint256 = self.nodes[node_id].index
    last: bytes32 = self.node_ids[len(self.node_ids) - 1]
    self.node_ids[index] = last
    self.nodes[last].index = index
    self.node_ids.pop()
    self.nodes[node_id].listed = False


@external
@payable
@nonreentrant
def register_node(
    name: String[128], url: String[256], manifest_hash: bytes32, model: String[128], layers: String[32]
):
    assert self.known[msg.sender], "unknown_account"
    bond: uint256 = self.registration_bond
    assert msg.value == bond * self.wei_per_token, "invalid_bond"
    node_id: bytes32 = keccak256(name)
    # Fields one by one: copying the struct would copy its strings for nothing.
    if self.nodes[node_id].operator != empty(address):
        assert self.nodes[node_id].removed, "duplicate_node"
        # Work a removed node served is paid to its old operator first.
        assert self.nodes[node_id].served == 0, "duplicate_node"
    index: uint256 = self.nodes[node_id].index
    if not self.nodes[node_id].listed:
        assert len(self.node_ids) < MAX_NODES, "too_many_nodes"
        index = len(self.node_ids)
        self.node_ids.append(node_id)
    self.bonded += bond
    self.total_deposited += bond
    self.nodes[node_id] = Node(
        operator=msg.sender, name=name, url=url, manifest_hash=manifest_hash, model=model,
        layers=layers, admitted=False, removed=False, listed=True, served=0,
        served_total=self.nodes[node_id].served_total, bond=bond, since=block.timestamp,
        index=index,
    )
    log journal.NodeRegistered(
        node_id=node_id, operator=msg.sender, name=name, url=url, manifest_hash=manifest_hash,
        model=model, layers=layers, bond=bond,
    )


@external
@nonreentrant
def admit_node(node_id: bytes32, manifest_hash: bytes32):
    """@notice An entry node (or the owner) vouches that it verified the node's attestation."""
    assert self.entries[msg.sender] or msg.sender == ownable.owner, "unauthorized"
    operator: address = self.nodes[node_id].operator
    assert operator != empty(address) and not self.nodes[node_id].removed, "unknown_node"
    assert self.nodes[node_id].manifest_hash == manifest_hash, "manifest_mismatch"
    if not self.nodes[node_id].admitted:
        self.nodes[node_id].admitted = True
        self.operator_nodes[operator] += 1
    log journal.NodeAdmitted(node_id=node_id, by=msg.sender, manifest_hash=manifest_hash)


@external
@nonreentrant
def edit_node(node_id: bytes32, url: String[256], manifest_hash: bytes32):
    operator: address = self.nodes[node_id].operator
    assert operator != empty(address) and not self.nodes[node_id].removed, "unknown_node"
    assert msg.sender == operator, "unauthorized"
    admitted: bool = self.nodes[node_id].admitted
    if manifest_hash != self.nodes[node_id].manifest_hash and admitted:
        # Different weights: the old admission does not cover them.
        admitted = False
        self.operator_nodes[operator] -= 1
        self.nodes[node_id].since = block.timestamp
    self.nodes[node_id].url = url
    self.nodes[node_id].manifest_hash = manifest_hash
    self.nodes[node_id].admitted = admitted
    log journal.NodeEdited(
        node_id=node_id, operator=msg.sender, url=url, manifest_hash=manifest_hash, admitted=admitted
    )


@external
@nonreentrant
def remove_node(node_id: bytes32):
    """@notice Work the node already served is still paid at the next distribution."""
    operator: address = self.nodes[node_id].operator
    assert operator != empty(address) and not self.nodes[node_id].removed, "unknown_node"
    assert msg.sender == operator, "unauthorized"
    if self.nodes[node_id].admitted:
        self.operator_nodes[operator] -= 1
    self.nodes[node_id].admitted = False
    self.nodes[node_id].removed = True
    if self.nodes[node_id].served == 0:
        self._unlist(node_id)  # nothing left to pay: free the slot now
    bond: uint256 = self.nodes[node_id].bond
    self.nodes[node_id].bond = 0
    self.bonded -= bond
    self.total_withdrawn += bond
    log journal.NodeRemoved(node_id=node_id, operator=msg.sender, bond=bond)
    if bond > 0:
        raw_call(operator, b"", value=bond * self.wei_per_token)


@external
@nonreentrant
def evict_node(node_id: bytes32):
    """@notice Anyone may evict a node left unadmitted for `admission_timeout`: its bond goes to the pool."""
    operator: address = self.nodes[node_id].operator
    assert operator != empty(address) and not self.nodes[node_id].removed, "unknown_node"
    assert not self.nodes[node_id].admitted, "node_admitted"
    assert self.nodes[node_id].served == 0, "node_admitted"  # unpaid work: after distribute
    assert block.timestamp >= self.nodes[node_id].since + self.admission_timeout, "too_early"
    self.nodes[node_id].removed = True
    self._unlist(node_id)
    bond: uint256 = self.nodes[node_id].bond
    self.nodes[node_id].bond = 0
    self.bonded -= bond
    self.pool += bond
    log journal.NodeEvicted(node_id=node_id, operator=operator, by=msg.sender, bond=bond)


@view
@external
def node_count() -> uint256:
    return len(self.node_ids)


@view
@external
def is_operator(account: address) -> bool:
    return self.operator_nodes[account] > 0



@external
@nonreentrant
def distribute():
    """@notice Anyone may call it: the split is fixed by the work recorded on chain."""
    total: uint256 = self.total_served
    pool_before: uint256 = self.pool
    if total == 0 or pool_before == 0:
        log journal.Distributed(
            epoch=self.epoch, pool_before=pool_before, distributed=0, remainder=pool_before, tokens=total
        )
        return
    distributed: uint256 = 0
    kept: DynArray[bytes32, MAX_NODES] = []
    for node_id: bytes32 in self.node_ids:
        served: uint256 = self.nodes[node_id].served
        operator: address = self.nodes[node_id].operator
        if served > 0:
            share: uint256 = pool_before * served // total
            self.earnings[operator] += share
            distributed += share
            self.nodes[node_id].served = 0
            log journal.Paid(node_id=node_id, operator=operator, epoch=self.epoch, amount=share, tokens=served)
        if self.nodes[node_id].removed:
            self.nodes[node_id].listed = False
        else:
            self.nodes[node_id].index = len(kept)
            kept.append(node_id)
    self.node_ids = kept
    self.pool = pool_before - distributed
    self.total_served = 0
    log journal.Distributed(
        epoch=self.epoch, pool_before=pool_before, distributed=distributed,
        remainder=pool_before - distributed, tokens=total,
    )
    self.epoch += 1


@external
@nonreentrant
def withdraw(amount: uint256):
    """@notice Pay `amount` tokens of the caller's earnings out in ETH."""
    # checks
    assert amount > 0, "invalid_amount"
    assert self.earnings[msg.sender] >= amount, "insufficient_earnings"
    # effects
    self.earnings[msg.sender] -= amount
    self.total_withdrawn += amount
    value: uint256 = amount * self.wei_per_token
    log journal.Withdrawn(operator=msg.sender, tokens=amount, value=value)
    # interaction, last
    raw_call(msg.sender, b"", value=value)



# -- epoch settlement (see settlement.vy) ------------------------------------------------


@external
@payable
@nonreentrant
def deposit_escrow(account: address):
    """@notice Buy tokens for `account` to spend off chain; the settler's ledger credits them."""
    assert msg.value > 0 and msg.value % self.wei_per_token == 0, "invalid_amount"
    tokens: uint256 = msg.value // self.wei_per_token
    self.total_deposited += tokens
    settlement._deposit(account, tokens, msg.value)


@external
@nonreentrant
def post_epoch(root: bytes32, total: uint256) -> uint256:
    """@notice The owner or a settler posts an epoch's root; `total` must be escrow-backed."""
    assert msg.sender == ownable.owner or settlement.settlers[msg.sender], "unauthorized"
    return settlement._post(root, total)


@external
@nonreentrant
def claim(epoch: uint256, account: address, amount: uint256, proof: DynArray[bytes32, 32]) -> uint256:
    """@notice Credit `account` (anyone may send it) what its cumulative `amount` adds; idempotent."""
    due: uint256 = settlement._claim(epoch, account, amount, proof)
    self.earnings[account] += due
    return due
