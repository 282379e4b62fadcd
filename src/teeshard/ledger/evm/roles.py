"""Who may do what on the contract: the owner (two-step transfer), entry nodes, settlers.

Every change here is the owner's (``unauthorized`` otherwise), except
``accept_ownership``, which only the offered new owner may send.
"""

from __future__ import annotations

from teeshard.ledger.evm.contract import ContractClient
from teeshard.ledger.interface import NotSupported

_OWNER_ONLY = {"unauthorized": "only the contract owner may change roles and settings"}


class Roles(ContractClient):
    def owner(self) -> str:
        return str(self._call("owner"))

    def pending_owner(self) -> str | None:
        pending = str(self._call("pending_owner"))
        return None if int(pending, 16) == 0 else pending

    def authorize_entry(
        self, entry: str, *, spend_limit: int | None = None, period_s: float = 86400.0
    ) -> None:
        if spend_limit is not None:
            raise NotSupported("spend limits are the SQL ledger's, which charges per request")
        address = self._address(entry)
        self._transact(
            "authorize_entry",
            address,
            True,
            messages={"unauthorized": "only the contract owner may authorise entry nodes"},
        )

    def deauthorize_entry(self, entry: str) -> None:
        """The entry may no longer reserve, settle or admit; its open reservations expire."""
        self._transact("authorize_entry", self._address(entry), False, messages=_OWNER_ONLY)

    def is_entry(self, entry: str) -> bool:
        return bool(self._call("entries", self._address(entry)))

    def authorize_settler(self, settler: str, authorised: bool = True) -> None:
        """Let ``settler`` post epoch roots (``EpochSettler``), or stop it."""
        self._transact(
            "authorize_settler", self._address(settler), authorised, messages=_OWNER_ONLY
        )

    def transfer_ownership(self, new_owner: str) -> None:
        """Offer the contract to ``new_owner``; nothing changes until it accepts."""
        self._transact("transfer_ownership", self._address(new_owner), messages=_OWNER_ONLY)

    def accept_ownership(self) -> None:
        self._transact(
            "accept_ownership",
            messages={"unauthorized": f"{self.actor} was not offered the ownership"},
        )

    def set_registration(self, bond: int, admission_timeout_s: int) -> None:
        """The bond (tokens) a registration pays, and how long a node may wait for admission."""
        self._transact("set_registration", bond, admission_timeout_s, messages=_OWNER_ONLY)

    def registration_bond(self) -> int:
        return int(self._call("registration_bond"))
