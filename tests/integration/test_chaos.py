"""A chaos run: three ranges, two replicas each after the entry's; clients send greedy
requests while non-entry nodes are killed (SIGKILL) and restarted at random, one at a
time, for a bounded time. Every request succeeds with the reference output, and the
ledger charges each exactly once and stays consistent."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import httpx

from teeshard.ledger.sql import SqlLedger
from tests.checkpoints import TinyModel
from tests.cluster import LocalCluster

CHAOS_S = 15.0
BODY = {"model": "tiny", "prompt": "Hello", "max_tokens": 60, "temperature": 0,
        "ignore_eos": True}  # fmt: skip


def test_requests_survive_nodes_killed_and_restarted(tiny_llama: TinyModel, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    owner = SqlLedger.open(url, "owner")
    owner.authorize_entry("entry-1")
    owner.open_account("alice")
    owner.deposit("alice", 10_000_000)
    owner.add_api_key("alice", "tsk_alice")
    options = {"ledger_url": url, "ledger_actor": "entry-1"}
    headers = {"Authorization": "Bearer tsk_alice"}
    with LocalCluster(
        tiny_llama.path, 3, subprocesses=True, replicas=2, entry_options=options, ban_s=2.0
    ) as cluster:
        target = cluster.entry.http_url + "/v1/completions"
        reference = httpx.post(target, json=BODY, headers=headers, timeout=60).json()
        cost = reference["usage"]["cost"]
        before = owner.balance("alice").available
        outcomes: list[str] = []
        stop = threading.Event()

        def client() -> None:
            with httpx.Client(timeout=90, headers=headers) as http:
                while not stop.is_set():
                    reply = http.post(target, json=BODY)
                    text = reply.json()["choices"][0]["text"] if reply.status_code == 200 else None
                    ok = text == reference["choices"][0]["text"]
                    outcomes.append("ok" if ok else f"{reply.status_code}: {reply.text[:200]}")

        clients = [threading.Thread(target=client) for _ in range(2)]
        for thread in clients:
            thread.start()
        kills = 0
        chooser = random.Random(7)
        deadline = time.monotonic() + CHAOS_S
        hard_deadline = time.monotonic() + 4 * CHAOS_S

        def failovers() -> int:
            return int(cluster.network_state()["counters"]["failovers"])

        try:
            # at least three kills even when a loaded machine restarts nodes slowly, and
            # on until some kill lands mid-request (a kill between requests is no failover;
            # which one lands is timing), but not past the hard deadline
            while (
                time.monotonic() < deadline or kills < 3 or failovers() == 0
            ) and time.monotonic() < hard_deadline:
                time.sleep(1.0)
                victim_index = chooser.randrange(1, len(cluster.nodes))
                cluster.nodes[victim_index].kill()
                kills += 1
                time.sleep(0.5)
                cluster.restart(victim_index)  # a new process, a new key, same address
                cluster.wait_routable()  # two replicas survive one failure at a time
        finally:
            stop.set()
            for thread in clients:
                thread.join()
        failed_over = failovers()

    assert kills >= 3 and len(outcomes) >= 4
    assert [o for o in outcomes if o != "ok"] == []
    assert failed_over >= 1  # some request did lose a node mid-way
    spent = before - owner.balance("alice").available
    assert spent == cost * len(outcomes)  # each charged once, at the no-failure price
    assert owner.balance("alice").reserved == 0
    assert owner.check().ok
    owner.close()
