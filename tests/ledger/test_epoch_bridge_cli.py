"""``teeshard ledger sync-escrow``, ``pool settle-epoch`` and ``pool claim`` on anvil, as a person runs them."""

from __future__ import annotations

from pathlib import Path

import pytest
from ledger_harness import evm_world
from trust_kit import KitNode, chain, entry_stage

from teeshard.cli import main
from teeshard.ledger.evm import Chain, EvmLedger
from teeshard.ledger.evm.chain import new_key
from teeshard.ledger.evm.settlement import deposit_escrow
from teeshard.ledger.keys import hash_api_key
from teeshard.ledger.sql import SqlLedger
from teeshard.model.layer_range import LayerRange


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_escrow_epoch_and_claim_from_the_command_line(
    anvil_chain: Chain,
    anvil_rpc: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    evm = evm_world("anvil", anvil_chain, anvil_rpc)
    assert isinstance(evm.owner, EvmLedger)
    settler, carol_key = new_key(), new_key()
    for key in (settler, carol_key):
        anvil_chain.fund(key.address, 10**18)
    evm.owner.authorize_settler(settler.address)
    alice, as_alice = evm.new_account()
    deposit_escrow(as_alice, alice, 1000)  # type: ignore[arg-type]
    carol = str(carol_key.address)

    url = f"sqlite:///{tmp_path / 'l.db'}"
    owner = SqlLedger.open(url, "owner")
    owner.authorize_entry("entry-1")
    owner.open_account(carol)
    node = KitNode("node-c", "c" * 64, LayerRange(1, 2))
    as_carol = owner.as_actor(carol)
    as_carol.register_node(node.info(), claim=node.claim(carol, as_carol))
    owner.admit_node("node-c", node.manifest, attested=node.attested(carol, owner))
    db = ["--ledger", url, "--actor", "owner", "--chain", evm.url]

    monkeypatch.setenv("TEESHARD_EVM_KEY", settler.key.hex())
    code, out, err = run(capsys, "ledger", "sync-escrow", *db)
    assert code == 0 and "credited 1 escrow deposits" in out and f"{alice}: +1000" in out, err
    code, out, _ = run(capsys, "ledger", "sync-escrow", *db)
    assert code == 0 and "credited 0 escrow deposits" in out  # once only

    owner.add_api_key(alice, "tsk_alice")
    entry = owner.as_actor("entry-1")
    entry.reserve("r1", alice, 50, key_hash=hash_api_key("tsk_alice"), max_tokens=30)
    receipts = chain("r1", [entry_stage(LayerRange(0, 1)), node])
    entry.settle("r1", 40, {"node-c": 30}, receipts=receipts)

    epochs = ["--epochs", str(tmp_path / "epochs")]
    code, out, err = run(capsys, "pool", "settle-epoch", *db, *epochs)
    assert code == 0 and "posted as epoch 0" in out and f"{carol}: earnings 20" in out, err
    code, out, _ = run(capsys, "pool", "settle-epoch", *db, *epochs)
    assert code == 0 and "nothing came due" in out  # the same epoch is not settled twice

    monkeypatch.setenv("TEESHARD_EVM_KEY", carol_key.key.hex())
    claim = ["pool", "claim", "--chain", evm.url, "--account", carol, *epochs]
    code, out, err = run(capsys, *claim, "--withdraw")
    assert code == 0 and "claimed 20 tokens" in out and "withdrew 20 tokens" in out, err
    code, out, _ = run(capsys, *claim)
    assert code == 0 and "claimed 0 tokens" in out

    code, out, _ = run(capsys, "ledger", "check", "--ledger", url, "--actor", "owner")
    assert code == 0 and "consistent" in out and "deposits 1000, withdrawals 20" in out
    assert evm.owner.check().ok
    owner.close()
