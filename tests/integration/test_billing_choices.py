"""Several choices per request are billed exactly, against a real PostgreSQL ledger.

Each choice is its own session and its own charge: its completion tokens, and the
prompt once per prompt (on the prompt's first choice), so the balance drops by
exactly the cost the usage reports. A retry with the same ``Idempotency-Key``
charges nothing more; a request whose choices cannot all be reserved is refused
before anything runs and holds nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from teeshard.ledger.sql import SqlLedger
from tests.checkpoints import TinyModel
from tests.cluster import LocalCluster
from tests.ledger.ledger_harness import postgres_url, reset_postgres

PROMPT_PER_1K, COMPLETION_PER_1K = 1000, 2000  # a token costs 1 and 2 units: no rounding
EOS = 1


@dataclass
class Shop:
    cluster: LocalCluster
    owner: SqlLedger

    def post(
        self, path: str, body: dict[str, Any], key: str = "tsk_alice", **headers: str
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json", **headers}
        return httpx.post(self.cluster.entry.http_url + path, content=json.dumps(body).encode(),
                          headers=headers, timeout=60)  # fmt: skip

    def available(self, account: str = "alice") -> int:
        return self.owner.balance(account).available


@pytest.fixture(scope="module")
def shop(tiny_llama: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    url = postgres_url()
    if url is None:
        pytest.skip("no PostgreSQL: set TEESHARD_TEST_POSTGRES_URL (scripts/services.sh)")
    reset_postgres(url)
    pricing = tmp_path_factory.mktemp("shop") / "pricing.toml"
    pricing.write_text(
        f"[models.tiny]\nprompt_per_1k = {PROMPT_PER_1K}\ncompletion_per_1k = {COMPLETION_PER_1K}\n"
    )
    owner = SqlLedger.open(url, "owner")
    owner.authorize_entry("entry-1")
    for name, funds in (("alice", 1_000_000), ("erin", 0)):
        owner.open_account(name)
        if funds:
            owner.deposit(name, funds)
        owner.add_api_key(name, f"tsk_{name}")
    options = {"ledger_url": url, "pricing_path": pricing, "ledger_actor": "entry-1"}
    with LocalCluster(tiny_llama.path, 2, entry_options=options) as cluster:
        yield Shop(cluster, owner)
    owner.close()


def completion_tokens(choice: dict[str, Any]) -> int:
    ids = choice["teeshard"]["completion_token_ids"]
    return len(ids) - (1 if ids and ids[-1] == EOS else 0)


def test_n_3_is_charged_for_its_three_completions_exactly(shop: Shop) -> None:
    before = shop.available()
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}],
            "n": 3, "max_tokens": 7, "temperature": 1.0, "seed": 8}  # fmt: skip
    response = shop.post("/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    answer = response.json()
    usage = answer["usage"]
    counts = [completion_tokens(c) for c in answer["choices"]]
    assert usage["completion_tokens"] == sum(counts) and len(counts) == 3
    single = shop.post("/v1/chat/completions", {**body, "n": 1}).json()["usage"]
    assert usage["prompt_tokens"] == single["prompt_tokens"]  # the prompt once
    cost = usage["prompt_tokens"] + 2 * usage["completion_tokens"]
    assert usage["cost"] == cost
    after = shop.owner.balance("alice")
    assert before - after.available == cost + single["cost"]
    assert after.reserved == 0
    assert shop.owner.check().ok


def test_a_list_of_prompts_pays_each_prompt_once_and_every_completion(shop: Shop) -> None:
    before = shop.available()
    body = {"model": "tiny", "prompt": ["First prompt", "The second, longer prompt"], "n": 2,
            "max_tokens": 5, "temperature": 0.8, "seed": 3, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    response = shop.post("/v1/completions", body)
    events = [
        json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")
    ]
    finals = [c for e in events for c in e["choices"] if "teeshard" in c]
    assert sorted(c["index"] for c in finals) == [0, 1, 2, 3]
    usage = events[-1]["usage"]
    prompts = [shop.post("/tokenize", {"prompt": p}).json()["count"] for p in body["prompt"]]
    assert usage["prompt_tokens"] == sum(prompts)
    assert usage["completion_tokens"] == sum(completion_tokens(c) for c in finals)
    assert usage["cost"] == sum(prompts) + 2 * usage["completion_tokens"]
    assert before - shop.available() == usage["cost"]
    assert shop.owner.balance("alice").reserved == 0


def test_an_idempotent_retry_of_n_3_charges_once(shop: Shop) -> None:
    before = shop.available()
    body = {"model": "tiny", "prompt": "Retry me", "n": 3, "max_tokens": 4, "temperature": 1.0}
    first = shop.post("/v1/completions", body, **{"Idempotency-Key": "order-n3"})
    assert first.status_code == 200, first.text
    charged = before - shop.available()
    assert charged == first.json()["usage"]["cost"] > 0
    retry = shop.post("/v1/completions", body, **{"Idempotency-Key": "order-n3"})
    assert retry.status_code == 409, retry.text
    # the same key with another n: its first choice is the one already charged
    other = shop.post("/v1/completions", {**body, "n": 1}, **{"Idempotency-Key": "order-n3"})
    assert other.status_code == 409
    assert shop.available() == before - charged
    assert shop.owner.balance("alice").reserved == 0
    assert shop.owner.check().ok


def test_choices_that_cannot_all_be_reserved_hold_nothing(shop: Shop) -> None:
    """The attack: n large enough that only some choices fit the balance. Nothing runs,
    nothing stays reserved, nothing is charged."""
    shop.owner.deposit("erin", 60)
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 10, "temperature": 0}
    one = shop.post("/v1/completions", body, key="tsk_erin")
    assert one.status_code == 200, one.text
    left = shop.available("erin")
    refused = shop.post("/v1/completions", {**body, "n": 4}, key="tsk_erin")
    assert refused.status_code == 402, refused.text
    assert shop.available("erin") == left
    assert shop.owner.balance("erin").reserved == 0
    assert shop.owner.check().ok


def test_an_abandoned_stream_of_n_3_releases_every_choice_and_pays_what_ran(shop: Shop) -> None:
    """The attack: hang up on a stream of three choices early. Every session closes on
    every node, nothing stays reserved, and no more than the three full answers is paid."""
    before = shop.available()
    body = {"model": "tiny", "prompt": "Once upon a time", "n": 3, "max_tokens": 200,
            "temperature": 1.0, "ignore_eos": True, "stream": True}  # fmt: skip
    headers = {"Authorization": "Bearer tsk_alice"}
    url = shop.cluster.entry.http_url + "/v1/completions"
    seen: set[int] = set()
    with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                seen.update(c["index"] for c in json.loads(line[6:])["choices"])
                if len(seen) == 3:
                    break  # every choice has started; the client walks away
    deadline = time.monotonic() + 10
    while shop.owner.balance("alice").reserved and time.monotonic() < deadline:
        time.sleep(0.05)
    assert shop.owner.balance("alice").reserved == 0
    charged = before - shop.available()
    prompt = shop.post("/tokenize", {"prompt": body["prompt"]}).json()["count"]
    assert prompt <= charged < prompt + 3 * 2 * 200  # the prompt once; not three full answers
    for node in shop.cluster.nodes:
        assert node.get("/health").json()["sessions"]["open"] == 0
    assert shop.owner.check().ok
