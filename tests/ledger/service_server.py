"""``teeshard ledger serve``'s app on loopback, in a thread, for the tests (a real uvicorn)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from teeshard.ledger.service import create_app
from teeshard.ledger.sql.engine import Engines


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serving(engines: Engines) -> Iterator[str]:
    """The base URL of a ledger service over ``engines``, until the block ends."""
    port = free_port()
    config = uvicorn.Config(create_app(engines), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the ledger service did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
