"""Compile ``TokenLedger.vy`` with the ``vyper`` package, cached on disk by source and version.

The contract imports its modules from beside it: ``journal.vy`` (the events),
``ownable.vy`` (two-step ownership) and ``settlement.vy`` (epoch settlement);
the cache key hashes all of them.

The EVM version is set explicitly (``cancun``: transient storage makes the
reentrancy lock cheap), both in the contract's pragma and here, so a newer
compiler default can never change the bytecode silently.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

CONTRACT = "TokenLedger.vy"
MODULES = ("journal.vy", "ownable.vy", "settlement.vy")
EVM_VERSION = "cancun"


@dataclass(frozen=True)
class Compiled:
    abi: list[dict[str, Any]]
    bytecode: str  # 0x-prefixed deployment bytecode
    source_hash: str  # sha256 of the .vy sources (contract and modules)
    vyper_version: str


def source(name: str = CONTRACT) -> str:
    return resources.files("teeshard.ledger.evm").joinpath(name).read_text()


def contract_path() -> Path:
    """The contract's file (its modules lie beside it), e.g. for ``boa.load``."""
    return Path(str(resources.files("teeshard.ledger.evm").joinpath(CONTRACT)))


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "teeshard" / "contracts"


@functools.cache
def compiled() -> Compiled:
    import vyper
    from vyper.compiler.input_bundle import FilesystemInputBundle
    from vyper.compiler.settings import Settings

    text = source()
    hasher = hashlib.sha256(text.encode())
    for name in MODULES:
        hasher.update(b"\0" + name.encode() + b"\0" + source(name).encode())
    digest = hasher.hexdigest()
    path = (
        cache_dir()
        / f"{Path(CONTRACT).stem}-{digest[:16]}-vyper{vyper.__version__}-{EVM_VERSION}.json"
    )
    try:
        data = json.loads(path.read_text())
        return Compiled(data["abi"], data["bytecode"], digest, vyper.__version__)
    except (OSError, ValueError, KeyError):
        pass
    out = vyper.compile_code(
        text,
        contract_path=CONTRACT,
        input_bundle=FilesystemInputBundle([contract_path().parent]),
        output_formats=["abi", "bytecode"],
        settings=Settings(evm_version=EVM_VERSION),
    )
    result = Compiled(out["abi"], out["bytecode"], digest, vyper.__version__)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"abi": result.abi, "bytecode": result.bytecode}))
        tmp.replace(path)  # atomic: a concurrent reader never sees half a file
    except OSError:
        pass  # a read-only home only costs a recompile next time
    return result
