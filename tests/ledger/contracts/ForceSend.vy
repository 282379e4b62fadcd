# pragma version ~=0.4.3
# pragma evm-version cancun
"""A stranger's contract that pays a target by self-destructing: the target cannot refuse."""


@deploy
@payable
def __init__():
    pass


@external
def boom(target: address):
    selfdestruct(target)
