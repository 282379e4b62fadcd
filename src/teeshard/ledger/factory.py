"""Open a ledger from a URL: the one place that knows every backend's URL form.

- ``sqlite:///path/ledger.db`` (the default, ``DEFAULT_URL``) or a plain path;
- ``postgresql://user:pass@host/db``;
- ``evm+http://host:8545?contract=0x...`` (or ``evm+https://``): any JSON-RPC
  node, Base Sepolia included; the signing key comes from the environment
  variable named by ``key_env`` (default ``TEESHARD_EVM_KEY``); ``from_block``
  (default 0) is where event scans start, normally the deployment block;
- ``evm+tester://``: a fresh in-process chain (py-evm) with a freshly deployed
  contract, for tests and benchmarks; it ends with the process;
- ``ledger+https://host:port`` (or ``ledger+http://`` on loopback): a ledger
  service (``teeshard ledger serve``); the actor key is ``$TEESHARD_LEDGER_KEY``.

Direct SQL access acts as ``actor`` (or ``$TEESHARD_LEDGER_ACTOR``); there is no
default: a name is not an identity, so whoever opens a database directly says
who they are, and a ledger that several parties share is reached through the
service, where the key is the identity. On chain the signing key is.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

from teeshard.ledger.interface import Ledger
from teeshard.paths import data_dir

DEFAULT_URL = "sqlite:///.teeshard/ledger.db"
ACTOR_ENV = "TEESHARD_LEDGER_ACTOR"
URL_ENV = "TEESHARD_LEDGER"


def default_url() -> str:
    return os.environ.get(URL_ENV) or DEFAULT_URL


def ledger_home() -> Path:
    """Where the ledger's local files live (entry outboxes): ``teeshard.paths.data_dir()``."""
    return data_dir()


def default_actor() -> str | None:
    return os.environ.get(ACTOR_ENV) or None


def open_ledger(url: str | None = None, *, actor: str | None = None) -> Ledger:
    url = url or default_url()
    if url.startswith("evm+"):
        return _open_evm(url)
    if url.startswith("ledger+"):
        from teeshard.ledger.remote import RemoteLedger

        return RemoteLedger.from_url(url)
    from teeshard.ledger.sql import SqlLedger

    name = actor or default_actor()
    if not name:
        raise ValueError(
            "say who acts on this SQL ledger: --actor NAME or $TEESHARD_LEDGER_ACTOR "
            "(a shared ledger is reached through `teeshard ledger serve` with a key)"
        )
    return SqlLedger.open(url, name)


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
