# pragma version ~=0.4.3
# pragma evm-version cancun
"""A junk-registration spammer: fills the node pool in a few transactions, paying each bond."""

interface Ledger:
    def open_account(): nonpayable
    def register_node(name: String[128], url: String[256], manifest_hash: bytes32, model: String[128], layers: String[32]): payable

ledger: public(address)


@deploy
def __init__(ledger: address):
    self.ledger = ledger
    extcall Ledger(ledger).open_account()


@external
@payable
def spam(first: uint256, count: uint256, bond_wei: uint256):
    for i: uint256 in range(first, first + count, bound=128):
        extcall Ledger(self.ledger).register_node(
            concat("junk-", uint2str(i)), "http://junk:1", keccak256("junk"), "", "", value=bond_wei
        )
