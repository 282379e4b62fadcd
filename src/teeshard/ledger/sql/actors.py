"""Actor keys of the ledger service: who a caller is, from a key it holds (stored hashed).

The owner makes a key for each party (``teeshard ledger add-actor NAME``); the
service (``teeshard.ledger.service``) finds the actor by the key's hash and acts
as that actor, so nobody who holds only a key can claim another name.
"""

from __future__ import annotations

from sqlalchemy import Connection, insert, select

from teeshard.ledger.interface import LedgerError, Unauthorized
from teeshard.ledger.keys import hash_api_key, new_api_key
from teeshard.ledger.sql.rows import now
from teeshard.ledger.sql.schema import actor_keys

ACTOR_KEY_PREFIX = "tsa_"


def add_actor_key(conn: Connection, actor: str) -> str:
    if not actor or len(actor) > 128 or actor.startswith("@"):
        raise LedgerError(f"actor names are 1-128 characters, not starting with '@': {actor!r}")
    key = ACTOR_KEY_PREFIX + new_api_key().removeprefix("tsk_")
    conn.execute(
        insert(actor_keys).values(key_hash=hash_api_key(key), actor=actor, created_at=now())
    )
    return key


def actor_for_key(conn: Connection, key: str) -> str:
    if not key:
        raise Unauthorized("the ledger service needs 'Authorization: Bearer <actor key>'")
    actor = conn.execute(
        select(actor_keys.c.actor).where(actor_keys.c.key_hash == hash_api_key(key))
    ).scalar_one_or_none()
    if actor is None:
        raise Unauthorized("unknown actor key")
    return str(actor)
