# pragma version ~=0.4.3
"""
@title Two-step ownership (a module of TokenLedger)
@notice The owner offers the contract to a new owner, who must accept it: a
        mistyped address cannot take the contract out of anyone's hands.
"""

event OwnershipOffered:
    owner: indexed(address)
    pending: indexed(address)

event OwnershipTransferred:
    previous: indexed(address)
    owner: indexed(address)

owner: public(address)
pending_owner: public(address)


@deploy
def __init__():
    self.owner = msg.sender


@internal
@view
def _check_owner():
    assert msg.sender == self.owner, "unauthorized"


@external
@nonreentrant
def transfer_ownership(new_owner: address):
    self._check_owner()
    self.pending_owner = new_owner
    log OwnershipOffered(owner=msg.sender, pending=new_owner)


@external
@nonreentrant
def accept_ownership():
    assert msg.sender == self.pending_owner and msg.sender != empty(address), "unauthorized"
    log OwnershipTransferred(previous=self.owner, owner=msg.sender)
    self.owner = msg.sender
    self.pending_owner = empty(address)
