"""The SQL ledger's pool: nodes (claims, admission epochs), work credited, distribution.

Functions take an open transaction; ``SqlLedger`` calls them with the right
identity. A settle records, per node, the tokens served and the share of the
request's cost its verified receipt earns (``teeshard.ledger.work``).
Distribution pays each operator exactly the credits of its nodes' work since the
last distribution (an epoch); everything else in the pool (revenue of work no
verified node did, and rounding) goes to the treasury account, so the pool pays
out exactly what was paid for each node's work and never more. Sums are taken
in Python integers (arbitrary precision), not by the database.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, insert, select, update

from teeshard.ledger.claims import AttestedNode, OperatorClaim, verify_claim
from teeshard.ledger.interface import (
    BackendError,
    ClaimRefused,
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
    get_meta,
    lock_account,
    lock_accounts,
    node_records,
    now,
    set_meta,
)
from teeshard.ledger.sql.schema import POOL, TREASURY, accounts, distributions, nodes, work
from teeshard.ledger.work import AttestedSigner, Credit

DEFAULT_ADMISSION_TTL_S = 3600.0  # an admission lasts one epoch unless the node is re-attested


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


def _admitted_now(row: Any) -> bool:
    return bool(row.admitted) and not row.removed and row.admitted_until > now()


def register_node(
    conn: Connection, operator: str, node: NodeInfo, claim: OperatorClaim | None, ledger_id: str
) -> NodeRecord:
    """Register (or take over an unadmitted registration of) a node, with its operator claim."""
    node = check_node_info(node)
    exists = conn.execute(select(accounts.c.id).where(accounts.c.id == operator)).first()
    if exists is None or operator.startswith("@"):
        raise UnknownAccount(f"operator {operator!r} has no account; open one first")
    if claim is None:
        raise ClaimRefused(
            f"registering {node.node_id!r} needs the node's operator claim, signed by its "
            "attested key (GET /v1/operator-claim; start the node with --operator ACCOUNT)"
        )
    verify_claim(claim, operator=operator, node_id=node.node_id, ledger_id=ledger_id)
    row = conn.execute(select(nodes).where(nodes.c.node_id == node.node_id)).one_or_none()
    values = dict(
        operator=operator, url=node.url, manifest_hash=node.manifest_hash, model=node.model,
        layers=node.layers, admitted=False, removed=False, certificate_pem=None,
        fingerprint=None, admitted_until=0.0,
    )  # fmt: skip
    if row is None:
        conn.execute(
            insert(nodes).values(node_id=node.node_id, served_total=0, created_at=now(), **values)
        )
    elif row.removed or (row.operator != operator and not _admitted_now(row)):
        # A registration never admitted (or whose admission expired) reserves nothing:
        # only the operator the node's attested key names will ever be admitted.
        conn.execute(update(nodes).where(nodes.c.node_id == node.node_id).values(**values))
    else:
        raise DuplicateNode(f"node {node.node_id!r} is already registered by {row.operator!r}")
    return _one(conn, node.node_id)


def admit_node(
    conn: Connection,
    node_id: str,
    manifest_hash: str,
    attested: AttestedNode | None,
    ledger_id: str,
) -> NodeRecord:
    """Admit (or re-admit for another epoch) a node the caller has just verified."""
    row = _node_row(conn, node_id)
    manifest_hash = check_manifest_hash(manifest_hash)
    if row.manifest_hash != manifest_hash:
        raise ManifestMismatch(
            f"node {node_id!r} registered manifest {row.manifest_hash}, "
            f"but its attestation shows {manifest_hash}: not admitted"
        )
    if attested is None:
        raise ClaimRefused(
            f"admitting {node_id!r} needs what was verified: its URL and a fresh operator "
            "claim made by its attested certificate"
        )
    if attested.url.rstrip("/") != row.url.rstrip("/"):
        raise ClaimRefused(
            f"the URL verified ({attested.url}) is not the URL registered for {node_id!r} "
            f"({row.url}): a relay, or a stale registration"
        )
    verify_claim(attested.claim, operator=row.operator, node_id=node_id, ledger_id=ledger_id)
    ttl = float(get_meta(conn, "admission_ttl_s") or DEFAULT_ADMISSION_TTL_S)
    conn.execute(
        update(nodes)
        .where(nodes.c.node_id == node_id)
        .values(
            admitted=True,
            certificate_pem=attested.claim.certificate_pem.decode(),
            fingerprint=attested.claim.fingerprint,
            admitted_until=now() + ttl,
        )
    )
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
    if checked.manifest_hash != row.manifest_hash or checked.url != row.url:
        # Different weights, or another place: the old admission does not cover them.
        values.update(manifest_hash=checked.manifest_hash, admitted=False, admitted_until=0.0)
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
    """Free use: the account operates a node that is admitted now (attested this epoch)."""
    found = conn.execute(
        select(nodes.c.node_id).where(
            (nodes.c.operator == account)
            & nodes.c.admitted.is_(True)
            & nodes.c.removed.is_(False)
            & (nodes.c.admitted_until > now())
        )
    ).first()
    return found is not None


def attested_signers(conn: Connection, served: Mapping[str, int]) -> dict[bytes, AttestedSigner]:
    """The served nodes' attested certificates by fingerprint; each must be admitted now."""
    signers = {}
    for node_id in served:
        row = _node_row(conn, node_id)
        if not _admitted_now(row):
            raise UnknownNode(
                f"node {node_id!r} is registered but not admitted (or its admission expired); "
                "it cannot be credited"
            )
        if row.fingerprint and row.certificate_pem:
            signers[bytes.fromhex(row.fingerprint)] = AttestedSigner(
                node_id, row.certificate_pem.encode(), row.manifest_hash, row.layers
            )
    return signers


def record_work(
    conn: Connection, request_id: str, served: Mapping[str, int], credits: list[Credit]
) -> None:
    current = epoch(conn)
    at = now()
    by_node = {c.node_id: c for c in credits}
    for node_id, tokens in sorted(served.items()):
        operator = conn.execute(
            select(nodes.c.operator).where(nodes.c.node_id == node_id)
        ).scalar_one()
        credit = by_node.get(node_id)
        conn.execute(
            insert(work).values(
                request_id=request_id,
                node_id=node_id,
                operator=operator,
                tokens=tokens,
                epoch=current,
                at=at,
                credit=credit.credit if credit else 0,
                layers=credit.layers if credit else 0,
            )
        )
        conn.execute(
            update(nodes)
            .where(nodes.c.node_id == node_id)
            .values(served_total=nodes.c.served_total + tokens)
        )


# -- distribution and withdrawal -----------------------------------------------------


def distribute(conn: Connection) -> Distribution:
    """Pay each operator its nodes' credits of this epoch; the rest of the pool to the treasury."""
    pool_before = lock_pool(conn)
    current = epoch(conn)
    node_tokens: dict[str, int] = {}
    shares: dict[str, int] = {}
    for node_id, operator, tokens, credit in conn.execute(
        select(work.c.node_id, work.c.operator, work.c.tokens, work.c.credit).where(
            work.c.epoch == current
        )
    ):
        node_tokens[node_id] = node_tokens.get(node_id, 0) + tokens
        if credit:
            shares[operator] = shares.get(operator, 0) + credit
    if pool_before == 0:
        return Distribution(0, 0, 0, {}, node_tokens)
    distributed = sum(shares.values())
    if distributed > pool_before:  # impossible unless the tables were edited behind the ledger
        raise BackendError(f"credits {distributed} exceed the pool {pool_before}: run check")
    treasury = pool_before - distributed
    lock_accounts(conn, [*shares, TREASURY])
    for operator, share in sorted(shares.items()):
        apply(conn, "distribute", operator, earnings=share, memo=f"epoch {current}")
    if treasury:
        apply(conn, "distribute", TREASURY, earnings=treasury, memo=f"epoch {current}")
    apply(conn, "distribute", POOL, pool=-pool_before, memo=f"epoch {current}")
    conn.execute(
        insert(distributions).values(
            epoch=current,
            at=now(),
            pool_before=pool_before,
            distributed=distributed,
            remainder=treasury,
            tokens=min(sum(node_tokens.values()), 2**62),
            treasury=treasury,
        )
    )
    set_meta(conn, "epoch", str(current + 1))
    return Distribution(pool_before, distributed, treasury, shares, node_tokens, treasury)


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
