"""The SQL ledger's pool: nodes, work served, distribution, withdrawal, and the audit.

Functions take an open transaction; ``SqlLedger`` calls them with the right
identity. Distribution pays each node's operator ``pool * tokens / total``
rounded down, over the work recorded since the last distribution (an epoch); what
rounding leaves stays in the pool for the next one, so nothing is lost. With
no work served, nothing is distributed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, func, insert, select, update

from teeshard.ledger.interface import (
    Consistency,
    Distribution,
    DuplicateNode,
    InsufficientEarnings,
    InvalidAmount,
    JournalEntry,
    ManifestMismatch,
    NodeInfo,
    NodeRecord,
    Unauthorized,
    UnknownAccount,
    UnknownNode,
    check_amount,
    check_manifest_hash,
    check_node_info,
)
from teeshard.ledger.sql.rows import (
    apply,
    epoch,
    lock_account,
    lock_accounts,
    node_records,
    now,
    set_meta,
)
from teeshard.ledger.sql.schema import (
    POOL,
    accounts,
    distributions,
    journal,
    nodes,
    reservations,
    work,
)


def lock_pool(conn: Connection) -> int:
    return int(lock_account(conn, POOL).available)


def pool_amount(conn: Connection) -> int:
    return int(conn.execute(select(accounts.c.available).where(accounts.c.id == POOL)).scalar_one())


# -- nodes ---------------------------------------------------------------------------


def _node_row(conn: Connection, node_id: str) -> Any:
    row = conn.execute(select(nodes).where(nodes.c.node_id == node_id)).one_or_none()
    if row is None or row.removed:
        raise UnknownNode(f"no registered node {node_id!r}")
    return row


def _one(conn: Connection, node_id: str) -> NodeRecord:
    return node_records(conn, node_id)[0]


def register_node(conn: Connection, operator: str, node: NodeInfo) -> NodeRecord:
    node = check_node_info(node)
    exists = conn.execute(select(accounts.c.id).where(accounts.c.id == operator)).first()
    if exists is None or operator == POOL:
        raise UnknownAccount(f"operator {operator!r} has no account; open one first")
    row = conn.execute(select(nodes).where(nodes.c.node_id == node.node_id)).one_or_none()
    values = dict(
        operator=operator,
        url=node.url,
        manifest_hash=node.manifest_hash,
        model=node.model,
        layers=node.layers,
        admitted=False,
        removed=False,
    )
    if row is None:
        conn.execute(
            insert(nodes).values(node_id=node.node_id, served_total=0, created_at=now(), **values)
        )
    elif row.removed:
        conn.execute(update(nodes).where(nodes.c.node_id == node.node_id).values(**values))
    else:
        raise DuplicateNode(f"node {node.node_id!r} is already registered by {row.operator!r}")
    return _one(conn, node.node_id)


def admit_node(conn: Connection, node_id: str, manifest_hash: str) -> NodeRecord:
    row = _node_row(conn, node_id)
    manifest_hash = check_manifest_hash(manifest_hash)
    if row.manifest_hash != manifest_hash:
        raise ManifestMismatch(
            f"node {node_id!r} registered manifest {row.manifest_hash}, "
            f"but its attestation shows {manifest_hash}: not admitted"
        )
    conn.execute(update(nodes).where(nodes.c.node_id == node_id).values(admitted=True))
    return _one(conn, node_id)


def _require_operator(row: Any, actor: str, what: str) -> None:
    if row.operator != actor:
        raise Unauthorized(
            f"only node {row.node_id!r}'s operator ({row.operator!r}) may {what} it; you are {actor!r}"
        )


def edit_node(
    conn: Connection, actor: str, node_id: str, url: str | None, manifest_hash: str | None
) -> NodeRecord:
    row = _node_row(conn, node_id)
    _require_operator(row, actor, "edit")
    checked = check_node_info(NodeInfo(node_id, url or row.url, manifest_hash or row.manifest_hash))
    values: dict[str, object] = {"url": checked.url}
    if checked.manifest_hash != row.manifest_hash:
        # Different weights: the old admission does not cover them.
        values.update(manifest_hash=checked.manifest_hash, admitted=False)
    conn.execute(update(nodes).where(nodes.c.node_id == node_id).values(**values))
    return _one(conn, node_id)


def remove_node(conn: Connection, actor: str, node_id: str) -> None:
    row = _node_row(conn, node_id)
    _require_operator(row, actor, "remove")
    # Work it already served stays recorded (with its operator) and is paid out at
    # the next distribution.
    conn.execute(
        update(nodes).where(nodes.c.node_id == node_id).values(removed=True, admitted=False)
    )


def list_nodes(conn: Connection) -> list[NodeRecord]:
    return node_records(conn)


def is_operator(conn: Connection, account: str) -> bool:
    found = conn.execute(
        select(nodes.c.node_id).where(
            (nodes.c.operator == account) & nodes.c.admitted.is_(True) & nodes.c.removed.is_(False)
        )
    ).first()
    return found is not None


def check_served_nodes(conn: Connection, served: Mapping[str, int]) -> None:
    for node_id in served:
        row = _node_row(conn, node_id)
        if not row.admitted:
            raise UnknownNode(
                f"node {node_id!r} is registered but not admitted; it cannot be credited"
            )


def record_work(conn: Connection, request_id: str, served: Mapping[str, int]) -> None:
    current = epoch(conn)
    at = now()
    for node_id, tokens in sorted(served.items()):
        operator = conn.execute(
            select(nodes.c.operator).where(nodes.c.node_id == node_id)
        ).scalar_one()
        conn.execute(
            insert(work).values(
                request_id=request_id,
                node_id=node_id,
                operator=operator,
                tokens=tokens,
                epoch=current,
                at=at,
            )
        )
        conn.execute(
            update(nodes)
            .where(nodes.c.node_id == node_id)
            .values(served_total=nodes.c.served_total + tokens)
        )


# -- distribution and withdrawal -----------------------------------------------------


def distribute(conn: Connection) -> Distribution:
    pool_before = lock_pool(conn)
    current = epoch(conn)
    rows = conn.execute(
        select(work.c.node_id, work.c.operator, func.sum(work.c.tokens))
        .where(work.c.epoch == current)
        .group_by(work.c.node_id, work.c.operator)
    ).all()
    node_tokens: dict[str, int] = {}
    pairs = [(node_id, operator, int(tokens)) for node_id, operator, tokens in rows]
    for node_id, _, tokens in pairs:
        node_tokens[node_id] = node_tokens.get(node_id, 0) + tokens
    total = sum(node_tokens.values())
    if total == 0 or pool_before == 0:
        return Distribution(pool_before, 0, pool_before, {}, node_tokens)
    # Each node's share is rounded down on its own, as the contract does.
    shares: dict[str, int] = {}
    for _, operator, tokens in sorted(pairs):
        shares[operator] = shares.get(operator, 0) + pool_before * tokens // total
    lock_accounts(conn, shares)
    for operator, share in sorted(shares.items()):
        if share:
            apply(conn, "distribute", operator, earnings=share, memo=f"epoch {current}")
    distributed = sum(shares.values())
    if distributed:
        apply(conn, "distribute", POOL, pool=-distributed, memo=f"epoch {current}")
    remainder = pool_before - distributed
    conn.execute(
        insert(distributions).values(
            epoch=current,
            at=now(),
            pool_before=pool_before,
            distributed=distributed,
            remainder=remainder,
            tokens=total,
        )
    )
    set_meta(conn, "epoch", str(current + 1))
    return Distribution(pool_before, distributed, remainder, shares, node_tokens)


def withdraw(conn: Connection, operator: str, amount: int | None) -> JournalEntry:
    row = lock_account(conn, operator)
    if amount is None:
        amount = int(row.earnings)
        if amount == 0:
            raise InvalidAmount(f"{operator!r} has no earnings to withdraw")
    check_amount(amount, "withdrawal")
    if amount > row.earnings:
        raise InsufficientEarnings(
            f"{operator!r} has {row.earnings} in earnings; cannot withdraw {amount}"
        )
    return apply(conn, "withdraw", operator, earnings=-amount)


# -- audit ---------------------------------------------------------------------------


def check(conn: Connection) -> Consistency:
    """Recompute every balance from the journal and compare it with the stored one."""
    sums = {
        row.account_id: row
        for row in conn.execute(
            select(
                journal.c.account_id,
                func.coalesce(func.sum(journal.c.available), 0).label("available"),
                func.coalesce(func.sum(journal.c.reserved), 0).label("reserved"),
                func.coalesce(func.sum(journal.c.earnings), 0).label("earnings"),
                func.coalesce(func.sum(journal.c.pool), 0).label("pool"),
            ).group_by(journal.c.account_id)
        )
    }
    open_reserved = dict(
        conn.execute(
            select(reservations.c.account_id, func.sum(reservations.c.amount))
            .where(reservations.c.state == "reserved")
            .group_by(reservations.c.account_id)
        ).all()
    )
    mismatches: list[str] = []
    held = 0
    stored_rows = conn.execute(select(accounts)).all()
    for row in stored_rows:
        s = sums.get(row.id)
        if row.id == POOL:
            derived = (int(s.pool) if s else 0, 0, 0)
            stored = (row.available, 0, 0)
        else:
            derived = (int(s.available), int(s.reserved), int(s.earnings)) if s else (0, 0, 0)
            stored = (row.available, row.reserved, row.earnings)
            if int(open_reserved.get(row.id, 0)) != row.reserved:
                mismatches.append(
                    f"{row.id}: reserved {row.reserved} but open reservations hold "
                    f"{open_reserved.get(row.id, 0)}"
                )
        if derived != stored or min(stored) < 0:
            mismatches.append(f"{row.id}: stored {stored}, journal says {derived}")
        held += sum(stored)
    total_in = _kind_sum(conn, "deposit", journal.c.available)
    total_out = -_kind_sum(conn, "withdraw", journal.c.earnings)
    if held != total_in - total_out:
        mismatches.append(f"held {held} != deposits {total_in} - withdrawals {total_out}")
    return Consistency(
        not mismatches, len(stored_rows), tuple(mismatches), total_in, total_out, held
    )


def _kind_sum(conn: Connection, kind: str, column: Any) -> int:
    return int(
        conn.execute(
            select(func.coalesce(func.sum(column), 0)).where(journal.c.kind == kind)
        ).scalar_one()
    )
