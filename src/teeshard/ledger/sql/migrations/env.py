"""Alembic environment for the ledger; run through ``teeshard.ledger.sql.engine.migrate``.

The caller passes an open connection in ``config.attributes["connection"]`` so
migrations run inside the process's own engine (and on SQLite, the same file
lock); there is no alembic.ini and no offline mode.
"""

from __future__ import annotations

from alembic import context

from teeshard.ledger.sql.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run ledger migrations through teeshard.ledger.sql.engine.migrate()")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
