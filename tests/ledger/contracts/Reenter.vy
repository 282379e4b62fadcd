# pragma version ~=0.4.3
# pragma evm-version cancun
"""An operator contract that tries to withdraw again from inside its payout."""

interface Ledger:
    def open_account(): nonpayable
    def register_node(name: String[128], url: String[256], manifest_hash: bytes32, model: String[128], layers: String[32]): nonpayable
    def withdraw(amount: uint256): nonpayable

ledger: public(address)
amount: uint256
reentry_tried: public(bool)
reentry_succeeded: public(bool)
received: public(uint256)


@deploy
def __init__(ledger: address):
    self.ledger = ledger


@external
def join(manifest_hash: bytes32):
    extcall Ledger(self.ledger).open_account()
    extcall Ledger(self.ledger).register_node("evil", "http://evil:1", manifest_hash, "", "")


@external
def attack(amount: uint256):
    self.amount = amount
    extcall Ledger(self.ledger).withdraw(amount)


@external
@payable
def __default__():
    self.received += msg.value
    if not self.reentry_tried:
        self.reentry_tried = True
        self.reentry_succeeded = raw_call(
            self.ledger,
            abi_encode(self.amount, method_id=method_id("withdraw(uint256)")),
            revert_on_failure=False,
        )
