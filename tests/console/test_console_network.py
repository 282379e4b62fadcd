"""The network page of a routed network in a real browser: replicas, health and load.

``teeshard up --replicas 2``: the entry serves layers 0:2 and routes every session
over two replicas of 2:4 from its registry. The page lists each range's replicas
with their attestation and health, and the load the registry measured from each
node's step counters (sessions, steps in flight, milliseconds a step).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from teeshard.ledger.sql import SqlLedger
from teeshard.procutil import free_port_block
from tests.checkpoints import TinyModel
from tests.console.browser import screenshot
from tests.console.conftest import PageFactory
from tests.console.stack import Stack, teeshard_up

pytestmark = pytest.mark.timeout(600)
KEY = "tsk_alice_routed"


@pytest.fixture(scope="module")
def routed(
    tiny_llama: TinyModel, tmp_path_factory: pytest.TempPathFactory, chromium: Any
) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("console-routed")
    ledger_url = f"sqlite:///{folder / 'ledger.db'}"
    pricing = folder / "pricing.toml"
    pricing.write_text("[models.tiny]\nprompt_per_1k = 1000\ncompletion_per_1k = 2000\n")
    port = free_port_block(3)  # the entry, then two replicas of 2:4
    owner = SqlLedger.open(ledger_url, "owner")
    owner.authorize_entry(f"127.0.0.1:{port}")
    owner.open_account("alice")
    owner.deposit("alice", 5000)
    owner.add_api_key("alice", KEY)
    owner.close()
    extra = ("--replicas", "2", "--probe-interval", "0.5")
    with teeshard_up(tiny_llama.path, port, ledger_url, pricing, extra=extra) as running:
        yield running


def replica_rows(page: Any) -> list[str]:
    rows = page.get_by_test_id("replicas").locator("tbody tr")
    rows.first.wait_for(timeout=30_000)
    return [rows.nth(i).inner_text() for i in range(rows.count())]


def test_the_network_page_shows_each_ranges_replicas_and_their_load(
    routed: Stack, open_page: PageFactory
) -> None:
    page = open_page(routed.url + "/#/network")
    rows = replica_rows(page)
    assert len(rows) == 2 and all("[2, 4)" in row and "✓ usable" in row for row in rows)
    ports = {str(routed.port + 1), str(routed.port + 2)}
    assert {p for p in ports if any(p in row for row in rows)} == ports
    assert all("0 of this entry's sessions" in row for row in rows)
    # some work: the replicas' step counters move, and the registry measures their steps
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 8, "temperature": 0}
    for _ in range(4):
        answer = httpx.post(routed.url + "/v1/completions", json=body, timeout=60,
                            headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
        assert answer.status_code == 200, answer.text
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        page.reload()
        rows = replica_rows(page)
        if any(" ms a step" in row for row in rows):
            break
        time.sleep(0.5)
    assert any(" ms a step" in row for row in rows), rows
    assert all("steps in flight" in row for row in rows)
    counters = page.locator("#replicas-heading ~ p").inner_text()
    assert "failover(s)" in counters and "route retries" in counters
    assert page.console_errors == []
    screenshot(page, "network-replicas")
