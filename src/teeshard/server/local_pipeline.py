"""A whole route of nodes on one host (``teeshard up``, tests, benchmarks): its policy.

Every node of a local route attests with the simulated provider (there is no
TEE here), so the policy allows simulated evidence, but only signed with this
machine's simulated key, and names the exact manifest hash expected for each
layer range (the entry's with its tokenizer and templates), computed from the
checkpoint. Verification is therefore real: a node serving other weights, or a
simulated node of another machine, is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from teeshard.attest import ManifestCache, compute_manifest, simulated_public_key
from teeshard.model import Checkpoint, LayerRange
from teeshard.paths import simulated_tee_dir

SIMULATED_NOTE = "# INSECURE: a local development route with simulated attestation, no TEE."


def local_policy_toml(
    checkpoint: Checkpoint, ranges: Sequence[LayerRange], dtype: str, model_name: str
) -> str:
    cache = ManifestCache.for_checkpoint(checkpoint.dir)
    key = simulated_public_key(simulated_tee_dir()).hex()
    lines = [SIMULATED_NOTE, "allow_simulated = true", f'simulated_keys = ["{key}"]', ""]
    for layers in ranges:
        manifest = compute_manifest(
            checkpoint, layers, dtype, model_name=model_name, cache=cache,
            entry_files=checkpoint.dir if layers.is_first() else None,  # the entry node's files
        )  # fmt: skip
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
