"""teeshard: confidential, split inference of large language models.

The packages, bottom to top (each imports only those before it)::

    model      architecture spec, checkpoint, shard loader, blocks + KV cache, sampling
    transport  wire messages, codec, the multiplexed socket to the next node
    attest     TEE providers, manifests, evidence, verifier + policy, receipts, sealing
    ledger     accounts, charges and the contribution pool (SQL, EVM)
    node       one pipeline stage: sessions, the step, the pipeline socket, the next hop
    entry      the OpenAI-compatible API on top of a stage
    server     the node process: config, trust set-up, app factory, runtime
    cli        the ``teeshard`` command

The names below are the library's front door; each package's own namespace has
the rest, with its whole error tree. They load on first use, so ``import
teeshard`` stays cheap for the command line.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    # model
    "Checkpoint": "teeshard.model",
    "LayerRange": "teeshard.model",
    "SamplingParams": "teeshard.model",
    "Shard": "teeshard.model",
    "load_shard": "teeshard.model",
    # attestation: verifying nodes and answers, sealing requests
    "Policy": "teeshard.attest",
    "SealedClient": "teeshard.attest",
    "verify_bundle": "teeshard.attest",
    "verify_chain": "teeshard.attest",
    # running nodes
    "NodeConfig": "teeshard.server",
    "build_node": "teeshard.server",
    "serve": "teeshard.server",
    # the ledger
    "open_ledger": "teeshard.ledger",
    # the error tree's roots
    "AttestationError": "teeshard.attest",
    "NodeError": "teeshard.node",
    "APIError": "teeshard.entry",
    "LedgerError": "teeshard.ledger",
}

__all__ = [
    "APIError",
    "AttestationError",
    "Checkpoint",
    "LayerRange",
    "LedgerError",
    "NodeConfig",
    "NodeError",
    "Policy",
    "SamplingParams",
    "SealedClient",
    "Shard",
    "__version__",
    "build_node",
    "load_shard",
    "open_ledger",
    "serve",
    "verify_bundle",
    "verify_chain",
]

if TYPE_CHECKING:
    from teeshard.attest import AttestationError, Policy, SealedClient, verify_bundle, verify_chain
    from teeshard.entry import APIError
    from teeshard.ledger import LedgerError, open_ledger
    from teeshard.model import Checkpoint, LayerRange, SamplingParams, Shard, load_shard
    from teeshard.node import NodeError
    from teeshard.server import NodeConfig, build_node, serve


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'teeshard' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
