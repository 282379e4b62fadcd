"""One signing key shared by threads and processes: who sends with which nonce.

Two processes signing with the same key used to count nonces each in its own
memory and send the same one: the second failed with "nonce too low". Now a
``NonceLease`` holds, from reading the nonce until the node has accepted the
signed transaction:

- the chain object's lock (threads of this process), and,
- on a JSON-RPC chain, an exclusive ``flock`` on a lock file per sending
  address (processes of this host), in ``$TEESHARD_HOME/nonces`` (else
  ``~/.cache/teeshard/nonces``).

Inside the lease the nonce is the chain's pending transaction count, which
counts every transaction the node accepted, from any process; nothing is
cached, so a restarted chain or a key used elsewhere cannot leave it stale.
Processes on other hosts, or a load-balanced RPC whose backends lag, can still
collide: ``transactions.transact`` then retries with a fresh nonce
(``is_nonce_error``).
"""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from teeshard.ledger.evm.chain import Chain

NONCE_RETRIES = 5
_NONCE_ERROR = re.compile(
    r"nonce too low|nonce too high|invalid nonce|already known|replacement transaction underpriced"
    r"|nonce has already been used",
    re.IGNORECASE,
)


def lock_dir() -> Path:
    home = os.environ.get("TEESHARD_HOME")
    if home:
        return Path(home) / "nonces"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "teeshard" / "nonces"


def is_nonce_error(exc: BaseException) -> bool:
    """Did a send fail because another sender took the nonce first?"""
    return _NONCE_ERROR.search(str(exc)) is not None


class NonceLease:
    """``with chain.nonce_for(address) as lease:`` sign with ``lease.value`` and send."""

    def __init__(self, chain: Chain, address: str) -> None:
        self.chain = chain
        self.address = address
        self.value = -1
        self._file: IO[bytes] | None = None

    def __enter__(self) -> NonceLease:
        self.chain.lock.acquire()
        try:
            if not self.chain.in_process:
                directory = lock_dir()
                directory.mkdir(parents=True, exist_ok=True)
                self._file = (directory / f"{self.address.lower()}.lock").open("ab")
                fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)
            self.value = self.chain.pending_count(self.address)
        except BaseException:
            self._close()
            self.chain.lock.release()
            raise
        return self

    def _close(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._close()
        finally:
            self.chain.lock.release()
