"""The ``teeshard ledger|pool|chain`` commands, run as a person would, on both backends."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
from ledger_harness import anvil_path
from tests.cluster import RunningNode

from teeshard.cli import main
from teeshard.ledger.anvil import DEV_KEY


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_sql_ledger_end_to_end(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    real_node: RunningNode,
    node_manifest: str,
) -> None:
    db = ["--ledger", f"sqlite:///{tmp_path / 'l.db'}"]
    assert run(capsys, "ledger", "open-account", "alice", *db)[0] == 0
    assert run(capsys, "ledger", "open-account", "op", *db)[0] == 0
    code, out, _ = run(capsys, "ledger", "deposit", "500", "--account", "alice", *db)
    assert code == 0 and "available: 500" in out
    code, key, err = run(capsys, "ledger", "new-key", "--account", "alice", *db)
    assert code == 0 and key.startswith("tsk_") and "shown once" in err
    assert key.strip() not in (tmp_path / "l.db").read_bytes().decode("latin-1")  # stored hashed
    assert run(capsys, "ledger", "authorize-entry", "entry-1", *db)[0] == 0

    url, policy = real_node.http_url, str(real_node.config.policy_path)
    # the policy written as `teeshard up` does: simulated allowed, every shard's manifest listed
    code, out, err = run(
        capsys, "pool", "register", "--url", url, "--policy", policy, "--node-id", "node-9",
        *db, "--actor", "op",
    )  # fmt: skip
    assert code == 0, err
    assert "registered node node-9" in out and "awaiting admission" in out
    assert "WARNING: INSECURE: simulated evidence accepted" in out
    code, out, err = run(
        capsys, "pool", "admit", "--url", url, "--expected-hash", node_manifest,
        "--allow-simulated", "--node-id", "node-9", *db, "--actor", "entry-1",
    )  # fmt: skip
    assert code == 0 and "admitted node node-9" in out, err
    refusals = [
        (("--expected-hash", "4" * 64, "--allow-simulated"), "is not an expected shard"),
        (("--expected-hash", node_manifest), "simulated evidence (no TEE) is refused"),
    ]
    for options, reason in refusals:
        code, _, err = run(capsys, "pool", "register", "--url", url, *options, *db, "--actor", "op")
        assert code == 1 and "teeshard: refused: " in err and reason in err, err

    from teeshard.ledger.sql import SqlLedger

    entry = SqlLedger.open(f"sqlite:///{tmp_path / 'l.db'}", "entry-1")
    entry.reserve("cli-1", "alice", 100)
    entry.settle("cli-1", 100, {"node-9": 12})
    entry.close()

    code, out, _ = run(capsys, "pool", "list", *db)
    assert code == 0 and "node-9" in out and "100 tokens to distribute" in out
    code, out, _ = run(capsys, "pool", "distribute", *db)
    assert code == 0 and "distributed 100" in out
    code, out, _ = run(capsys, "pool", "withdraw", "40", *db, "--actor", "op")
    assert code == 0 and "withdrew 40" in out
    code, out, _ = run(capsys, "ledger", "balance", "--account", "op", *db)
    assert re.search(r"earnings:\s+60", out)
    code, out, _ = run(capsys, "ledger", "history", "--account", "alice", *db)
    assert code == 0 and "settle" in out and "deposit" in out
    code, out, _ = run(capsys, "ledger", "check", *db)
    assert code == 0 and "consistent" in out


def test_cli_errors_are_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = ["--ledger", f"sqlite:///{tmp_path / 'l.db'}"]
    run(capsys, "ledger", "open-account", "alice", *db)
    cases = [
        (("ledger", "deposit", "0", "--account", "alice"), "invalid_amount"),
        (("ledger", "deposit", "5", "--account", "bob"), "unknown_account: no account 'bob'"),
        (("ledger", "deposit", "5", "--account", "alice", "--actor", "mallory"), "unauthorized"),
        (("pool", "remove", "nothing"), "unknown_node"),
        (("pool", "withdraw"), "unknown_account: no account 'owner'"),
        (("pool", "withdraw", "--actor", "alice"), "'alice' has no earnings to withdraw"),
    ]
    for argv, message in cases:
        code, _, err = run(capsys, *argv, *db)
        assert code == 1 and message in err and "Traceback" not in err, (argv, err)
    usage = [  # refused before any node is contacted; bad input is status 2
        ((), 2, "name the model's expected shard hashes: --expected FILE, --expected-hash HASH"),
        (("--policy", str(tmp_path / "none.toml")), 2, "cannot read policy"),
        (("--expected-hash", "abc"), 1, "ledger_error: manifest hash must be 64 hex digits"),
    ]
    for options, status, message in usage:
        argv = ("pool", "register", "--url", "http://127.0.0.1:9", *options, *db)
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
