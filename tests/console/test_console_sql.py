"""The console in a real browser against a live ``teeshard up`` billing through SQLite.

Chat streams an answer and every stage's receipt verifies in the browser; a
receipt altered in transit shows as failed; a user with no balance is told so;
the account page shows balance and usage; the network page lists every node;
registering a node through the pool page admits it. Screenshots of each page
at desktop and phone width go under the test run's output.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from teeshard.ledger.sql import SqlLedger
from tests.checkpoints import TinyModel
from tests.console.browser import screenshot
from tests.console.conftest import PageFactory
from tests.console.stack import Stack, entry_port, operator_node, teeshard_up

pytestmark = pytest.mark.timeout(600)
ALICE, BOB, CAROL = "tsk_alice_console", "tsk_bob_console", "tsk_carol_console"


@pytest.fixture(scope="module")
def stack(
    tiny_llama: TinyModel, tmp_path_factory: pytest.TempPathFactory, chromium: Any
) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("console")
    ledger_url = f"sqlite:///{folder / 'ledger.db'}"
    pricing = folder / "pricing.toml"
    pricing.write_text("[models.tiny]\nprompt_per_1k = 1000\ncompletion_per_1k = 2000\n")
    port = entry_port()
    owner = SqlLedger.open(ledger_url, "owner")
    owner.authorize_entry(f"127.0.0.1:{port}")
    for name, key, funds in (("alice", ALICE, 5000), ("bob", BOB, 0), ("carol", CAROL, 0)):
        owner.open_account(name)
        if funds:
            owner.deposit(name, funds)
        owner.add_api_key(name, key)
    owner.close()
    with teeshard_up(tiny_llama.path, port, ledger_url, pricing) as running:
        yield running


def ask(page: Any, text: str) -> Any:
    page.get_by_label("Message").fill(text)
    page.get_by_label("Message").press("Enter")
    answer = page.get_by_test_id("answer").last
    answer.locator(".usage, .error").first.wait_for(timeout=60_000)
    return answer


def set_greedy(page: Any, max_tokens: int = 12) -> None:
    page.get_by_text("Sampling").click()
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens").fill(str(max_tokens))


def test_chat_streams_an_answer_and_every_stage_verifies(
    stack: Stack, open_page: PageFactory
) -> None:
    page = open_page(stack.url, ALICE)
    page.get_by_label("Model").locator("option", has_text="tiny").wait_for(state="attached")
    set_greedy(page)
    answer = ask(page, "Hello there")
    verdict = answer.get_by_test_id("verdict")
    verdict.wait_for(timeout=30_000)
    assert verdict.inner_text() == "✓ verified"
    answer.locator(".verification summary").click()  # open the panel
    rows = answer.locator("tbody tr")
    assert rows.count() == 2  # both stages signed, each verified
    assert all("✓ verified" in rows.nth(i).inner_text() for i in range(2))
    assert answer.locator(".badge.insecure").count() == 2  # simulated evidence, said loudly
    assert stack.entry_id in rows.nth(0).inner_text()
    assert "[0, 2)" in rows.nth(0).inner_text() and "[2, 4)" in rows.nth(1).inner_text()
    usage = answer.get_by_test_id("usage").inner_text()
    assert re.search(r"\d+ prompt \+ \d+ completion tokens · cost \d+", usage)
    assert answer.locator(".markdown").inner_text().strip() != ""
    assert page.console_errors == []  # no CSP violation, no script error
    screenshot(page, "chat")
    # the conversation is kept in the browser, under a title taken from the prompt
    page.reload()
    assert page.get_by_role("button", name="Hello there", exact=True).count() == 1


def test_a_receipt_altered_in_transit_shows_failed(stack: Stack, open_page: PageFactory) -> None:
    page = open_page(stack.url, ALICE)
    altered: list[str] = []

    def tamper(route: Any) -> None:
        response = route.fetch()
        events = []
        for event in response.text().split("\n\n"):
            if '"receipts"' in event:
                body = json.loads(event.removeprefix("data: "))
                receipt = body["receipts"][-1]
                flipped = "0" if receipt["sent_sha256"][0] != "0" else "1"
                receipt["sent_sha256"] = flipped + receipt["sent_sha256"][1:]
                altered.append(receipt["request_id"])
                event = "data: " + json.dumps(body)
            events.append(event)
        route.fulfill(response=response, body="\n\n".join(events))

    page.route("**/v1/chat/completions", tamper)
    set_greedy(page, 6)
    answer = ask(page, "Is this answer genuine?")
    verdict = answer.get_by_test_id("verdict")
    verdict.wait_for(timeout=30_000)
    assert altered, "the route saw no receipts to alter"
    assert verdict.inner_text() == "✗ FAILED"
    rows = answer.locator("tbody tr")
    assert "✓ verified" in rows.nth(0).inner_text()  # stage 0 is untouched
    last = rows.nth(1).inner_text()
    assert "FAILED" in last and "signature by the stage's attested key" in last
    screenshot(page, "chat-tampered")


def failed_over(segments: Any) -> Any:
    """A route handler that gives the answer's last event ``receipt_segments``, made by
    ``segments(receipts, token_count)`` from its genuine receipts."""

    def handle(route: Any) -> None:
        response = route.fetch()
        events = []
        for event in response.text().split("\n\n"):
            if '"receipts"' in event:
                body = json.loads(event.removeprefix("data: "))
                count = len(body["teeshard"]["completion_token_ids"])
                body["receipt_segments"] = segments(body["receipts"], count)
                event = "data: " + json.dumps(body)
            events.append(event)
        route.fulfill(response=response, body="\n\n".join(events))

    return handle


def test_an_answer_that_failed_over_shows_its_route_segments(
    stack: Stack, open_page: PageFactory
) -> None:
    # The shape of an answer whose first route lost its last node before producing a
    # token (only the entry signed: it proves nothing), then a second route made it all.
    page = open_page(stack.url, ALICE)
    page.route("**/v1/chat/completions", failed_over(lambda receipts, n: [
        {"tokens": [0, 0], "receipts": receipts[:1]},
        {"tokens": [0, n], "receipts": receipts},
    ]))  # fmt: skip
    set_greedy(page, 6)
    answer = ask(page, "Which routes made this?")
    verdict = answer.get_by_test_id("verdict")
    verdict.wait_for(timeout=30_000)
    assert verdict.inner_text() == "✓ verified"
    answer.locator(".verification summary").click()
    rows = answer.get_by_test_id("segments").locator("tbody tr")
    assert rows.count() == 2
    first, second = rows.nth(0).inner_text(), rows.nth(1).inner_text()
    assert "[0, 0)" in first and "partial: a node was lost" in first
    assert "[0, " in second and "✓ verified" in second
    screenshot(page, "chat-failed-over")

    # segments that claim tokens their last stage never sent do not verify
    page.unroute("**/v1/chat/completions")
    page.route("**/v1/chat/completions", failed_over(lambda receipts, n: [
        {"tokens": [0, 1], "receipts": receipts},
        {"tokens": [1, n], "receipts": receipts},
    ]))  # fmt: skip
    answer = ask(page, "And this one?")
    verdict = answer.get_by_test_id("verdict")
    verdict.wait_for(timeout=30_000)
    assert verdict.inner_text() == "✗ FAILED"
    answer_rows = answer.get_by_test_id("segments").locator("tbody tr")
    assert "FAILED" in answer_rows.nth(0).inner_text()
    assert page.console_errors == []


def test_a_user_with_no_balance_gets_a_clear_message(stack: Stack, open_page: PageFactory) -> None:
    page = open_page(stack.url, BOB)
    set_greedy(page, 6)
    answer = ask(page, "Hello")
    error = answer.get_by_role("alert").inner_text()
    assert "insufficient balance" in error and "Buy tokens on the Account page" in error


def test_no_key_is_asked_for(stack: Stack, open_page: PageFactory) -> None:
    page = open_page(stack.url)
    answer = ask(page, "Hello")
    assert "Enter your API key on the Account page" in answer.get_by_role("alert").inner_text()


def test_account_page_shows_balance_and_usage(stack: Stack, open_page: PageFactory) -> None:
    page = open_page(stack.url + "/#/account", ALICE)
    available = page.get_by_test_id("available")
    available.wait_for()
    owner = SqlLedger.open(stack.ledger_url, "owner")
    try:
        assert int(available.inner_text()) == owner.balance("alice").available
    finally:
        owner.close()
    rows = page.locator("#usage-heading + .table-wrap tbody tr")
    rows.first.wait_for()
    assert "settled" in rows.first.inner_text()
    assert "teeshard ledger deposit" in page.locator("#buy-heading + p + pre").inner_text()
    screenshot(page, "account")


def test_network_page_lists_every_node(stack: Stack, open_page: PageFactory) -> None:
    page = open_page(stack.url + "/#/network")
    rows = page.get_by_test_id("stages").locator("tbody tr")
    rows.first.wait_for()
    assert rows.count() == 2
    texts = [rows.nth(i).inner_text() for i in range(2)]
    assert "[0, 2)" in texts[0] and "[2, 4)" in texts[1]
    assert all("✓ verified" in t and "INSECURE" in t for t in texts)
    assert "fresh" in texts[0]
    assert "every layer attested" in page.locator("#models-heading + ul").inner_text()
    assert str(stack.port + 1) in page.locator("#models-heading ~ p").inner_text()
    screenshot(page, "network")


def test_registering_a_node_through_the_pool_page_admits_it(
    stack: Stack, open_page: PageFactory, tiny_llama: TinyModel
) -> None:
    with operator_node(tiny_llama.path, stack, "carol") as url:
        page = open_page(stack.url + "/#/pool", CAROL)
        page.get_by_label("Node URL").fill(url)
        page.get_by_role("button", name="Check attestation").click()
        found = page.get_by_test_id("found")
        found.wait_for(timeout=30_000)
        assert "[2, 4)" in found.inner_text() and "INSECURE" in found.inner_text()
        node_id = url.removeprefix("https://")
        page.get_by_role("button", name=f"Register {node_id}").click()
        status = page.get_by_test_id("pool-status")
        status.wait_for(timeout=30_000)
        assert f"Registered and admitted {node_id}" in status.inner_text()
        row = page.get_by_test_id("pool-nodes").locator("tbody tr", has_text=node_id)
        row.wait_for()
        assert "admitted" in row.inner_text()
        owner = SqlLedger.open(stack.ledger_url, "owner")
        try:
            (record,) = [n for n in owner.nodes() if n.node_id == node_id]
            assert record.admitted and record.operator == "carol" and record.layers == "2:4"
        finally:
            owner.close()
        screenshot(page, "pool")
        # the claim names carol: alice cannot register carol's node as hers
        other = open_page(stack.url + "/#/pool", ALICE)
        other.get_by_label("Node URL").fill(url)
        other.get_by_role("button", name="Check attestation").click()
        other.get_by_test_id("found").wait_for(timeout=30_000)
        other.get_by_role("button", name=f"Register {node_id}").click()
        alert = other.get_by_role("alert")
        alert.wait_for(timeout=30_000)
        assert "claim names operator 'carol'" in alert.inner_text()


def test_a_node_outside_the_policy_is_refused(stack: Stack, open_page: PageFactory) -> None:
    page = open_page(stack.url + "/#/pool", CAROL)
    page.get_by_label("Node URL").fill("https://127.0.0.1:9")  # nothing listens there
    page.get_by_role("button", name="Check attestation").click()
    alert = page.get_by_role("alert")
    alert.wait_for(timeout=30_000)
    assert "could not fetch the attestation bundle" in alert.inner_text()


def test_answers_render_as_markdown_and_never_as_html(stack: Stack, open_page: PageFactory) -> None:
    """Attack: an answer carrying markup; and an answer whose receipts are stripped."""
    page = open_page(stack.url, ALICE)
    text = "Code:\n```python\nprint('hi')\n```\n<img src=x onerror=\"window.pwned=1\"> **bold**"
    chunk = {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 9}}
    stream = "".join(f"data: {json.dumps(e)}\n\n" for e in (chunk, usage)) + "data: [DONE]\n\n"
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=200, body=stream, content_type="text/event-stream"),
    )
    answer = ask(page, "Show me code")
    answer.get_by_test_id("verdict").wait_for(timeout=30_000)
    markdown = answer.locator(".markdown")
    assert markdown.locator("pre.code code").inner_text() == "print('hi')"
    assert markdown.locator("strong").inner_text() == "bold"
    assert markdown.locator("img").count() == 0 and "<img src=x" in markdown.inner_text()
    assert page.evaluate("window.pwned") is None
    # no receipts: never shown as verified
    assert answer.get_by_test_id("verdict").inner_text() == "✗ FAILED"
    assert "the answer carries no receipts" in answer.locator(".verification").inner_text()


LABELLED = """() => [...document.querySelectorAll('input, select, textarea')]
  .filter((el) => !el.labels || el.labels.length === 0)
  .map((el) => el.outerHTML)"""


@pytest.mark.parametrize("route", ["chat", "account", "network", "pool"])
def test_every_page_is_labelled_and_fits_a_phone(
    stack: Stack, open_page: PageFactory, route: str
) -> None:
    page = open_page(f"{stack.url}/#/{route}", ALICE)
    page.locator("main h1, main .chat").first.wait_for()
    page.wait_for_timeout(300)  # let the page's first fetches land
    assert page.evaluate(LABELLED) == []  # every field has a label
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(150)
    # nothing wider than the phone but the tables' own scrolling boxes
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    # keyboard: the first Tab reaches the skip link, which moves focus to the content
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "skip"
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main"
    assert page.console_errors == []


def test_an_operator_of_an_admitted_node_is_told_it_uses_the_model_free(
    stack: Stack, open_page: PageFactory
) -> None:
    owner = SqlLedger.open(stack.ledger_url, "owner")
    try:
        if not any(n.operator == "carol" and n.admitted for n in owner.nodes()):
            pytest.skip("needs the node admitted by the pool test")
    finally:
        owner.close()
    page = open_page(stack.url + "/#/account", CAROL)
    page.get_by_text("you use the model free").wait_for(timeout=30_000)


def test_stop_ends_the_request_and_nothing_stays_held(stack: Stack, open_page: PageFactory) -> None:
    """Stop aborts the request in flight; the ledger holds nothing for it afterwards.

    The request is held in the browser until Stop is clicked, so the click always
    lands on a request in flight (the tiny model would otherwise finish first).
    The node's side of an abandoned stream is tested with the billing.
    """
    owner = SqlLedger.open(stack.ledger_url, "owner")
    try:
        before = owner.balance("alice")
        page = open_page(stack.url, ALICE)
        held: list[Any] = []
        page.route("**/v1/chat/completions", lambda route: held.append(route))
        set_greedy(page, 50)
        page.get_by_label("Message").fill("Tell me a long story")
        page.get_by_label("Message").press("Enter")
        page.get_by_role("button", name="Stop").click()
        answer = page.get_by_test_id("answer").last
        answer.get_by_text("Stopped.").wait_for(timeout=10_000)
        assert held, "the request never left the page"
        assert answer.get_by_test_id("verdict").count() == 0  # nothing to verify
        assert page.get_by_role("button", name="Send").is_visible()
        assert owner.balance("alice") == before  # nothing reserved, nothing charged
        # the conversation goes on
        with contextlib.suppress(Exception):
            held[0].abort()  # the page gave up on it already
        page.unroute("**/v1/chat/completions")
        assert ask(page, "Shorter then").get_by_test_id("usage").count() == 1
    finally:
        owner.close()


def test_sealed_mode_sends_only_ciphertext_and_the_answer_still_verifies(
    stack: Stack, open_page: PageFactory
) -> None:
    """What an ingress outside the TEE sees of a sealed chat: no prompt, no key, no answer."""
    page = open_page(stack.url, ALICE)
    seen: list[Any] = []
    page.on("request", lambda request: seen.append(request))
    answers: list[bytes] = []
    page.on(
        "response",
        lambda response: answers.append(response.body()) if "/v1/sealed" in response.url else None,
    )
    page.get_by_label("Sealed mode").check()
    set_greedy(page, 8)
    prompt = "A secret for the enclave only"
    answer = ask(page, prompt)
    verdict = answer.get_by_test_id("verdict")
    verdict.wait_for(timeout=30_000)
    assert verdict.inner_text() == "✓ verified"
    assert answer.get_by_test_id("sealed-note").count() == 1
    text = answer.locator(".markdown").inner_text().strip()
    assert text
    posts = [r for r in seen if r.method == "POST"]
    assert [r.url.removeprefix(stack.url) for r in posts] == ["/v1/sealed"]
    sealed = posts[0]
    assert "authorization" not in sealed.headers
    body = sealed.post_data_buffer
    assert prompt.encode() not in body and ALICE.encode() not in body
    assert b"messages" not in body and len(body) > 32 + 16
    assert answers and b"receipts" not in answers[0] and text.encode() not in answers[0]
    # the switch is remembered, and a sealed request cannot be replayed by the ingress
    replay = httpx.post(stack.url + "/v1/sealed", content=body,
                        headers={"content-type": "application/teeshard-sealed"}, timeout=30)  # fmt: skip
    assert replay.status_code == 409
    page.reload()
    assert page.get_by_label("Sealed mode").is_checked()
