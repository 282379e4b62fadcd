"""Open a ledger from a URL: the one place that knows every backend's URL form.

- ``sqlite:///path/ledger.db`` (the default, ``DEFAULT_URL``) or a plain path;
- ``postgresql://user:pass@host/db``;
- ``evm+http://host:8545?contract=0x...`` (or ``evm+https://``): any JSON-RPC
  node, Base Sepolia included; the signing key comes from the environment
  variable named by ``key_env`` (default ``TEESHARD_EVM_KEY``); ``from_block``
  (default 0) is where event scans start, normally the deployment block;
- ``evm+tester://``: a fresh in-process chain (py-evm) with a freshly deployed
  contract, for tests and benchmarks; it ends with the process.

SQL ledgers act as ``actor`` (default: ``$TEESHARD_LEDGER_ACTOR``, else
``owner``); on chain the key is the identity.
"""

from __future__ import annotations

import os
from urllib.parse import parse_qs, urlsplit, urlunsplit

from teeshard.ledger.interface import Ledger

DEFAULT_URL = "sqlite:///.teeshard/ledger.db"
ACTOR_ENV = "TEESHARD_LEDGER_ACTOR"
URL_ENV = "TEESHARD_LEDGER"


def default_url() -> str:
    return os.environ.get(URL_ENV) or DEFAULT_URL


def default_actor() -> str:
    return os.environ.get(ACTOR_ENV) or "owner"


def open_ledger(url: str | None = None, *, actor: str | None = None) -> Ledger:
    url = url or default_url()
    if url.startswith("evm+"):
        return _open_evm(url)
    from teeshard.ledger.sql import SqlLedger

    return SqlLedger.open(url, actor or default_actor())


def _open_evm(url: str) -> Ledger:
    from teeshard.ledger.evm import Chain, EvmLedger
    from teeshard.ledger.evm.chain import KEY_ENV, key_from_env, new_key

    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    scheme = parts.scheme.removeprefix("evm+")
    if scheme == "tester":
        chain = Chain.tester()
        key = new_key()
        chain.fund(key.address, 10**24)
        address, block = chain.deploy(key)
        return EvmLedger(chain, address, key, from_block=block)
    if scheme not in ("http", "https"):
        raise ValueError(
            f"unsupported EVM ledger URL {url!r}: use evm+http(s)://HOST?contract=0x..."
        )
    contract = query.get("contract")
    if not contract:
        raise ValueError(f"the EVM ledger URL needs ?contract=0xADDRESS: {url!r}")
    rpc = urlunsplit((scheme, parts.netloc, parts.path, "", ""))
    key = key_from_env(query.get("key_env", KEY_ENV))
    return EvmLedger(Chain.connect(rpc), contract, key, from_block=int(query.get("from_block", 0)))
