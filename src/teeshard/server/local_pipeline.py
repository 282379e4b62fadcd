"""A whole route of nodes on one host (``teeshard up``, tests, benchmarks): its policy.

Every node of a local route attests with the simulated provider (there is no
TEE here), so the policy allows simulated evidence, and names the exact
manifest hash expected for each layer range, computed from the checkpoint.
Verification is therefore real: a node serving other weights is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from teeshard.attest import ManifestCache, compute_manifest
from teeshard.model import Checkpoint, LayerRange

SIMULATED_NOTE = "# INSECURE: a local development route with simulated attestation, no TEE."


def local_policy_toml(
    checkpoint: Checkpoint, ranges: Sequence[LayerRange], dtype: str, model_name: str
) -> str:
    cache = ManifestCache.for_checkpoint(checkpoint.dir)
    lines = [SIMULATED_NOTE, "allow_simulated = true", ""]
    for layers in ranges:
        manifest = compute_manifest(checkpoint, layers, dtype, model_name=model_name, cache=cache)
        lines += [
            "[[manifests]]",
            f'model = "{model_name}"',
            f'layers = "{layers}"',
            f'hash = "{manifest.combined_hash.hex()}"',
            "",
        ]
    return "\n".join(lines)


def write_local_policy(
    path: Path, checkpoint: Checkpoint, ranges: Sequence[LayerRange], dtype: str, model_name: str
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(local_policy_toml(checkpoint, ranges, dtype, model_name))
    return path
