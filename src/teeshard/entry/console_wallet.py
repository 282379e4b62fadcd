"""Unsigned contract transactions for the user's own wallet (EIP-1193), on an EVM ledger.

The entry node never holds a user's key. For the actions a user signs on chain
(open an account, bind an API key, deposit, register a node with its bond, withdraw) the
console asks the entry node for the transaction's ``to``, ``data`` and
``value``: the ABI encoding of the ledger contract's call, which the page hands
to ``window.ethereum`` (``eth_sendTransaction``), where the wallet shows and
signs it. Pure, apart from reading the contract's price of a token once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from teeshard.ledger.interface import LedgerError, check_amount, check_manifest_hash
from teeshard.ledger.keys import hash_api_key

WalletAction = Literal["open_account", "bind_key", "deposit", "register_node", "withdraw"]


class WalletTxRequest(BaseModel):
    """What the page asks for; only the fields its action needs are read."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    action: WalletAction
    account: str | None = Field(None, max_length=64, description="wallet address (deposit)")
    amount: int | None = Field(None, description="tokens (deposit) or earnings (withdraw)")
    api_key: str | None = Field(None, max_length=256, description="key to bind (its hash only)")
    node_id: str | None = Field(None, max_length=128)
    url: str | None = Field(None, max_length=256)
    manifest_hash: str | None = Field(None, max_length=66)
    model: str | None = Field(None, max_length=128)
    layers: str | None = Field(None, max_length=32)


@dataclass(frozen=True)
class WalletTx:
    to: str
    data: str  # 0x-prefixed calldata
    value: int  # wei

    def to_json(self) -> dict[str, Any]:
        # quantities as 0x hex, as EIP-1193 wallets take them
        return {"to": self.to, "data": self.data, "value": hex(self.value)}


class WalletTxError(ValueError):
    """The request cannot become a transaction (a missing or bad field)."""


def _need(value: Any, name: str) -> Any:
    if value is None or value == "":
        raise WalletTxError(f"{name} is required for this action")
    return value


def prepare(ledger: Any, request: WalletTxRequest) -> WalletTx:
    """Encode ``request`` as a call to the ledger contract (``ledger`` is an ``EvmLedger``)."""
    from web3 import Web3

    contract = ledger.contract
    value = 0
    args: list[Any]
    match request.action:
        case "open_account":
            args = []
        case "bind_key":
            args = [bytes.fromhex(hash_api_key(_need(request.api_key, "api_key")))]
        case "deposit":
            account = _need(request.account, "account")
            if not Web3.is_address(account):
                raise WalletTxError(f"account {account!r} is not a wallet address")
            amount = _check(request.amount, "deposit")
            args = [Web3.to_checksum_address(account)]
            value = amount * ledger.wei_per_token()
        case "register_node":
            manifest = _manifest(request.manifest_hash)
            args = [_need(request.node_id, "node_id"), _need(request.url, "url"),
                    bytes.fromhex(manifest), request.model or "", request.layers or ""]  # fmt: skip
            value = int(ledger.registration_bond()) * ledger.wei_per_token()  # the bond
        case "withdraw":
            args = [_check(request.amount, "withdrawal")]
    data = contract.encode_abi(request.action, args=args)
    return WalletTx(str(ledger.address), str(data), value)


def _check(amount: int | None, what: str) -> int:
    try:
        return check_amount(_need(amount, "amount"), what)
    except LedgerError as exc:  # InvalidAmount
        raise WalletTxError(exc.message) from None


def _manifest(value: str | None) -> str:
    try:
        return check_manifest_hash(_need(value, "manifest_hash"))
    except LedgerError as exc:
        raise WalletTxError(exc.message) from None
