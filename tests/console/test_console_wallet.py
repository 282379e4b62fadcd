"""Buying tokens through the user's wallet, on an EVM ledger (the contract on anvil).

The page talks to an EIP-1193 provider injected as ``window.ethereum`` that
forwards every request to anvil, whose dev accounts are unlocked: the wallet
"signs" as anvil's second dev account. The entry node only prepares each call
(``/v1/console/wallet/tx``); the wallet sends it; the ledger contract moves the
money. Skips without anvil (``scripts/services.sh`` installs it) or Chromium.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from teeshard.procutil import free_port
from tests.checkpoints import TinyModel
from tests.console.browser import screenshot
from tests.console.conftest import PageFactory
from tests.console.stack import Stack, entry_port, operator_node, teeshard_up
from tests.ledger.ledger_harness import anvil_path

pytestmark = pytest.mark.timeout(600)
USER_KEY = "tsk_wallet_user_console"
# window.ethereum for the page: each request goes to the test, which forwards it to anvil
PROVIDER = """
window.ethereum = {
  isTestProvider: true,
  request: async ({method, params}) => {
    const reply = await window.__anvil(method, params || []);
    if (reply.error) { const e = new Error(reply.error.message); e.code = reply.error.code; throw e; }
    return reply.result;
  },
};
"""


class Evm:
    def __init__(self, rpc: str) -> None:
        from teeshard.ledger.evm import Chain, EvmLedger
        from teeshard.ledger.evm.chain import new_key

        self.rpc = rpc
        chain = Chain.connect(rpc)
        owner_key, self.entry_key = new_key(), new_key()
        for key in (owner_key, self.entry_key):
            chain.fund(key.address, 10**19)
        self.address, self.block = chain.deploy(owner_key)
        self.owner = EvmLedger(chain, self.address, owner_key, from_block=self.block)
        self.user = chain.w3.eth.accounts[1]  # anvil's unlocked dev account: the "wallet"

    @property
    def ledger_url(self) -> str:
        return f"evm+{self.rpc}?contract={self.address}&from_block={self.block}"

    def forward(self, method: str, params: list[Any]) -> dict[str, Any]:
        if method in ("eth_requestAccounts", "eth_accounts"):
            return {"result": [self.user]}
        body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
        return dict(httpx.post(self.rpc, json=body, timeout=30).json())


@pytest.fixture(scope="module")
def evm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Evm]:
    binary = anvil_path()
    if binary is None:
        pytest.skip("anvil is not installed (run scripts/services.sh or set TEESHARD_ANVIL)")
    from teeshard.ledger import anvil

    state = tmp_path_factory.mktemp("anvil") / "state.json"
    chain = anvil.start(state, port=free_port(), anvil=binary)
    try:
        yield Evm(chain.rpc_url)
    finally:
        anvil.stop(state)


@pytest.fixture(scope="module")
def stack(
    evm: Evm, tiny_llama: TinyModel, tmp_path_factory: pytest.TempPathFactory, chromium: Any
) -> Iterator[Stack]:
    pricing = tmp_path_factory.mktemp("console-evm") / "pricing.toml"
    pricing.write_text("[models.tiny]\nprompt_per_1k = 1000\ncompletion_per_1k = 2000\n")
    evm.owner.authorize_entry(evm.entry_key.address)
    env = {"TEESHARD_EVM_KEY": evm.entry_key.key.hex()}
    with teeshard_up(tiny_llama.path, entry_port(), evm.ledger_url, pricing, env) as running:
        yield running


def test_buying_tokens_through_the_wallet_raises_the_balance(
    evm: Evm, stack: Stack, open_page: PageFactory, tmp_path: Path
) -> None:
    def bind(page: Any) -> Any:
        page.context.expose_function("__anvil", evm.forward)
        return page

    page = open_page("about:blank", USER_KEY, init_script=PROVIDER)
    bind(page).goto(stack.url + "/#/account")
    page.get_by_role("button", name="Connect wallet").click()
    page.get_by_role("button", name="Open account with this key").click()
    available = page.get_by_test_id("available")
    available.wait_for(timeout=60_000)  # the key is bound to the wallet: the account shows
    assert int(available.inner_text()) == 0
    page.get_by_label("Tokens to buy").fill("500")
    page.get_by_role("button", name="Buy", exact=True).click()
    page.get_by_test_id("wallet-status").get_by_text("Bought 500 tokens.").wait_for(timeout=60_000)
    page.get_by_test_id("available").get_by_text("500", exact=True).wait_for(timeout=30_000)
    balance = evm.owner.balance(evm.user)
    assert balance.available == 500 and balance.reserved == 0
    assert evm.owner.account_for_key(USER_KEY).lower() == evm.user.lower()
    screenshot(page, "account-wallet")

    # the tokens pay for an answer, verified like any other
    page.goto(stack.url + "/#/chat")
    page.get_by_text("Sampling").click()
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens").fill("6")
    page.get_by_label("Message").fill("Paid from my wallet")
    page.get_by_label("Message").press("Enter")
    verdict = page.get_by_test_id("answer").last.get_by_test_id("verdict")
    verdict.wait_for(timeout=60_000)
    assert verdict.inner_text() == "✓ verified"
    assert evm.owner.balance(evm.user).available < 500


def test_registering_a_node_through_the_wallet_admits_it(
    evm: Evm, stack: Stack, open_page: PageFactory, tiny_llama: TinyModel
) -> None:
    """The wallet signs register_node (with its bond); the entry verifies and admits it."""
    if evm.owner.balance(evm.user).available == 0:
        pytest.skip("needs the account the wallet test opened")
    with operator_node(tiny_llama.path, stack, evm.user) as url:
        page = open_page("about:blank", USER_KEY, init_script=PROVIDER)
        page.context.expose_function("__anvil", evm.forward)
        page.goto(stack.url + "/#/pool")
        page.get_by_label("Node URL").fill(url)
        page.get_by_role("button", name="Check attestation").click()
        page.get_by_test_id("found").wait_for(timeout=30_000)
        node_id = url.removeprefix("https://")
        page.get_by_role("button", name=f"Register {node_id}").click()
        status = page.get_by_test_id("pool-status")
        status.get_by_text(f"Registered and admitted {node_id}.").wait_for(timeout=60_000)
        (record,) = [n for n in evm.owner.nodes() if n.node_id == node_id]
        assert record.admitted and record.operator.lower() == evm.user.lower()
        assert record.layers == "2:4"
        screenshot(page, "pool-wallet")


def test_a_deposit_of_nothing_is_refused_before_the_wallet_sees_it(evm: Evm, stack: Stack) -> None:
    for amount in (0, -3, 2**62):
        refused = httpx.post(
            stack.url + "/v1/console/wallet/tx",
            json={"action": "deposit", "account": evm.user, "amount": amount},
            timeout=30,
        )
        assert refused.status_code == 400, refused.text
    bad = httpx.post(
        stack.url + "/v1/console/wallet/tx",
        json={"action": "deposit", "account": "alice", "amount": 5},
        timeout=30,
    )
    assert bad.status_code == 400 and "wallet address" in bad.json()["error"]["message"]
    info = httpx.get(stack.url + "/v1/console/info", timeout=30).json()
    assert info["ledger"] == "evm" and info["evm"]["contract"].lower() == evm.address.lower()
