"""Issue 9 item 3: identity is a key the ledger service checks, not a name the caller gives.

The attacks (on the old SQL ledger, where the actor was a self-declared name that
defaulted to ``owner``): bob deposited 1,000,000 to himself; as ``owner`` he
authorised his own "entry node" and drained alice. Through the service, bob's key
acts as bob and nothing else. The whole behaviour suite also runs through the
service (the ``service`` backend of ``world``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from service_server import serving

from teeshard.ledger.factory import open_ledger
from teeshard.ledger.interface import BackendError, Unauthorized
from teeshard.ledger.keys import hash_api_key
from teeshard.ledger.remote import RemoteLedger
from teeshard.ledger.sql import SqlLedger


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[tuple[SqlLedger, str]]:
    owner = SqlLedger.open(f"sqlite:///{tmp_path / 'ledger.db'}", "owner")
    for name, funds in (("alice", 5000), ("bob", 0)):
        owner.open_account(name)
        if funds:
            owner.deposit(name, funds)
    owner.add_api_key("alice", "tsk_alice")
    with serving(owner.engines) as url:
        yield owner, url
    owner.close()


def test_bob_cannot_mint_act_as_owner_or_drain_alice(shared: tuple[SqlLedger, str]) -> None:
    owner, url = shared
    bob = RemoteLedger(url, owner.add_actor_key("bob"))
    assert bob.actor == "bob"
    with pytest.raises(Unauthorized, match="only the ledger owner"):
        bob.deposit("bob", 1_000_000)
    with pytest.raises(Unauthorized):
        bob.authorize_entry("bob")  # his own "entry node"
    with pytest.raises(Unauthorized, match="not an authorised entry"):
        bob.reserve("drain", "alice", 5000, key_hash=hash_api_key("tsk_alice"))
    with pytest.raises(Unauthorized):
        bob.add_api_key("alice", "tsk_bobs")  # a key to alice's account
    # A name in the request changes nothing: the key is the identity.
    raw = httpx.post(
        f"{url}/v1/ledger/deposit",
        json={"account": "bob", "amount": 1_000_000, "actor": "owner"},
        headers={"Authorization": "Bearer " + owner.add_actor_key("bob"), "X-Actor": "owner"},
    )
    assert raw.status_code == 403
    assert owner.balance("bob").available == 0 and owner.balance("alice").available == 5000
    assert owner.check().ok
    bob.close()


def test_keys_are_checked_and_bad_input_is_a_clear_error(shared: tuple[SqlLedger, str]) -> None:
    owner, url = shared
    for headers in ({}, {"Authorization": "Bearer tsa_forged"}):
        answer = httpx.post(f"{url}/v1/ledger/balance", json={"account": "alice"}, headers=headers)
        assert answer.status_code == 401, answer.text
    key = owner.add_actor_key("alice")
    auth = {"Authorization": f"Bearer {key}"}
    for body, status in ((b"not json", 400), (b"[1]", 400), (b'{"account": 7}', 400)):
        answer = httpx.post(f"{url}/v1/ledger/balance", content=body, headers=auth)
        assert answer.status_code == status and "error" in answer.json()
    assert httpx.post(f"{url}/v1/ledger/drop_tables", json={}, headers=auth).status_code == 404
    alice = RemoteLedger(url, key)  # and it keeps serving
    assert alice.balance("alice").available == 5000
    alice.close()
    with pytest.raises(Unauthorized):
        owner.as_actor("bob").add_actor_key("bob")  # only the owner makes keys


def test_direct_sql_access_names_its_actor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEESHARD_LEDGER_ACTOR", raising=False)
    # The attack: with no --actor, bob was 'owner' on a fresh or shared database.
    with pytest.raises(ValueError, match="say who acts"):
        open_ledger(f"sqlite:///{tmp_path / 'l.db'}")
    monkeypatch.setenv("TEESHARD_LEDGER_KEY", "tsa_forged")
    with pytest.raises(BackendError, match="did not answer"):
        open_ledger("ledger+http://127.0.0.1:9")  # nothing listens: the error says so
