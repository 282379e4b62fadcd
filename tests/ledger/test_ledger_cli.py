"""The ``teeshard ledger|pool|chain`` commands, run as a person would, on both backends."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
from ledger_harness import ClaimRoute, anvil_path
from tests.cluster import RunningNode
from trust_kit import KitNode, chain, entry_stage

from teeshard.cli import main
from teeshard.ledger.anvil import DEV_KEY
from teeshard.model.layer_range import LayerRange


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_sql_ledger_end_to_end(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    real_node: RunningNode,
    node_manifest: str,
    claims: ClaimRoute,
) -> None:
    path = f"sqlite:///{tmp_path / 'l.db'}"
    code, _, err = run(capsys, "ledger", "open-account", "alice", "--ledger", path)
    assert code == 1 and "say who acts" in err  # no default actor: a name is not an identity
    db = ["--ledger", path, "--actor", "owner"]  # the first to open it owns it
    assert run(capsys, "ledger", "open-account", "alice", *db)[0] == 0
    assert run(capsys, "ledger", "open-account", "op", *db)[0] == 0
    code, out, _ = run(capsys, "ledger", "deposit", "500", "--account", "alice", *db)
    assert code == 0 and "available: 500" in out
    code, key, err = run(capsys, "ledger", "new-key", "--account", "alice", *db)
    assert code == 0 and key.startswith("tsk_") and "shown once" in err
    assert key.strip() not in (tmp_path / "l.db").read_bytes().decode("latin-1")  # stored hashed
    assert run(capsys, "ledger", "authorize-entry", "entry-1", *db)[0] == 0

    url, policy = real_node.http_url, str(real_node.config.policy_path)
    node_id = real_node.config.resolved_node_id
    claims.operator = "op"  # the node was started with --operator op
    owner, db = db, db[:2]
    # the policy written as `teeshard up` does: simulated allowed, every shard's manifest listed
    code, out, err = run(
        capsys, "pool", "register", "--url", url, "--policy", policy, *db, "--actor", "op",
    )  # fmt: skip
    assert code == 0, err
    assert f"registered node {node_id}" in out and "awaiting admission" in out
    assert "WARNING: INSECURE: simulated evidence accepted" in out
    code, out, err = run(
        capsys, "pool", "admit", "--url", url, "--expected-hash", node_manifest,
        "--allow-simulated", *db, "--actor", "entry-1",
    )  # fmt: skip
    assert code == 0 and f"admitted node {node_id}" in out, err
    refusals = [
        (("--expected-hash", "4" * 64, "--allow-simulated"), "is not an expected shard"),
        (("--expected-hash", node_manifest), "simulated evidence (no TEE) is refused"),
    ]
    for options, reason in refusals:
        code, _, err = run(capsys, "pool", "register", "--url", url, *options, *db, "--actor", "op")
        assert code == 1 and "teeshard: refused: " in err and reason in err, err

    from teeshard.ledger.keys import hash_api_key
    from teeshard.ledger.sql import SqlLedger

    assert real_node.node is not None
    served = KitNode(node_id, node_manifest, LayerRange(2, 4),
                     identity=real_node.node.trust.attestation.identity)  # fmt: skip
    receipts = chain("cli-1", [entry_stage(LayerRange(0, 2)), served])
    entry = SqlLedger.open(path, "entry-1")
    entry.reserve("cli-1", "alice", 100, key_hash=hash_api_key(key.strip()))
    entry.reserve("cli-2", "alice", 10, key_hash=hash_api_key(key.strip()))  # never settled
    entry.settle("cli-1", 100, {node_id: 12}, receipts=receipts)
    entry.close()

    code, out, _ = run(capsys, "pool", "list", *owner)
    assert code == 0 and "100 tokens to distribute" in out
    code, out, _ = run(capsys, "pool", "distribute", *owner)
    assert code == 0 and "distributed 50, treasury 50" in out  # its 2 layers of 4
    code, out, _ = run(capsys, "pool", "withdraw", "40", *db, "--actor", "op")
    assert code == 0 and "withdrew 40" in out
    code, out, _ = run(capsys, "ledger", "balance", "--account", "op", *owner)
    assert re.search(r"earnings:\s+10", out)
    code, out, _ = run(capsys, "pool", "withdraw", "--treasury", *owner)
    assert code == 0 and "withdrew 50" in out
    code, out, _ = run(capsys, "ledger", "history", "--account", "alice", *owner)
    assert code == 0 and "settle" in out and "deposit" in out
    code, out, _ = run(capsys, "ledger", "check", "--stuck-after", "0", *owner)
    assert code == 0 and "consistent" in out and "STUCK cli-2: 10 of alice" in out


def test_cli_errors_are_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = ["--ledger", f"sqlite:///{tmp_path / 'l.db'}"]
    run(capsys, "ledger", "open-account", "alice", *db, "--actor", "owner")
    cases = [
        (("ledger", "deposit", "0", "--account", "alice"), "invalid_amount"),
        (("ledger", "deposit", "5", "--account", "bob"), "unknown_account: no account 'bob'"),
        (("ledger", "deposit", "5", "--account", "alice", "--actor", "mallory"), "unauthorized"),
        (("pool", "remove", "nothing"), "unknown_node"),
        (("pool", "withdraw"), "unknown_account: no account 'owner'"),
        (("pool", "withdraw", "--actor", "alice"), "'alice' has no earnings to withdraw"),
        (("ledger", "add-actor", "bob", "--actor", "alice"), "only the ledger owner"),
    ]
    for argv, message in cases:
        if "--actor" not in argv:
            argv = (*argv, "--actor", "owner")
        code, _, err = run(capsys, *argv, *db)
        assert code == 1 and message in err and "Traceback" not in err, (argv, err)
    usage = [  # refused before any node is contacted; bad input is status 2
        ((), 2, "name the model's expected shard hashes: --expected FILE, --expected-hash HASH"),
        (("--policy", str(tmp_path / "none.toml")), 2, "cannot read policy"),
        (("--expected-hash", "abc"), 1, "ledger_error: manifest hash must be 64 hex digits"),
    ]
    for options, status, message in usage:
        argv = ("pool", "register", "--url", "http://127.0.0.1:9", *options, *db, "--actor", "op")
        code, _, err = run(capsys, *argv)
        assert code == status and message in err and "Traceback" not in err, (argv, err)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_evm_ledger_on_a_persistent_anvil_chain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = anvil_path()
    if binary is None:
        pytest.skip("anvil is not installed (run scripts/services.sh or set TEESHARD_ANVIL)")
    monkeypatch.setenv("TEESHARD_ANVIL", binary)
    monkeypatch.setenv("TEESHARD_EVM_KEY", DEV_KEY)
    state = str(tmp_path / "chain.json")
    port = str(_free_port())
    code, out, err = run(capsys, "chain", "start", "--state", state, "--port", port, "--deploy")
    assert code == 0, err
    url = re.search(r"ledger URL: (\S+)", out).group(1)  # type: ignore[union-attr]
    try:
        me = ["--ledger", url]
        assert run(capsys, "ledger", "open-account", *me)[0] == 0
        code, out, err = run(capsys, "ledger", "deposit", "250", *me)
        assert code == 0 and "available: 250" in out, err
        assert run(capsys, "chain", "stop", "--state", state)[0] == 0
        # the chain comes back with its state
        assert run(capsys, "chain", "start", "--state", state, "--port", port)[0] == 0
        code, out, _ = run(capsys, "ledger", "balance", *me)
        assert code == 0 and re.search(r"available:\s+250", out)
        code, out, _ = run(capsys, "ledger", "check", *me)
        assert code == 0 and "consistent" in out
        code, _, err = run(capsys, "ledger", "deposit", "-1", *me)
        assert code == 1 and "invalid_amount" in err
    finally:
        run(capsys, "chain", "stop", "--state", state)
