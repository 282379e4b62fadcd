"""Where teeshard keeps what it builds: one place for every package and the CLI."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["data_dir", "simulated_tee_dir"]


def data_dir() -> Path:
    """Where teeshard keeps built artefacts: $TEESHARD_HOME, else ~/.cache/teeshard."""
    home = os.environ.get("TEESHARD_HOME")
    if home:
        return Path(home)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "teeshard"


def simulated_tee_dir() -> Path:
    """Where the simulated (INSECURE) TEE provider keeps this machine's signing key."""
    return data_dir() / "simulated-tee"
