"""The manifest's ``quantize`` field: it names the recipe, and only when set changes the bytes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from teeshard.attest.encoding import lp
from teeshard.attest.errors import FormatError, ManifestError
from teeshard.attest.manifest import ManifestBuilder, ShardManifest, compute_manifest
from teeshard.model.checkpoint import Checkpoint
from teeshard.model.layer_range import LayerRange
from teeshard.model.loader import load_shard
from teeshard.model.quantize import INT8_RECIPE, W8A8_RECIPE, Int8Linear


def test_an_unquantized_manifest_encodes_as_before(manifests: dict[str, ShardManifest]) -> None:
    base = manifests["2:3"]
    assert base.quantize is None and b"quantize" not in base.canonical_bytes()
    quantized = dataclasses.replace(base, quantize=INT8_RECIPE)
    suffix = lp(b"quantize") + lp(INT8_RECIPE.encode())
    assert quantized.canonical_bytes() == base.canonical_bytes() + suffix
    assert quantized.combined_hash != base.combined_hash
    other = dataclasses.replace(base, quantize=INT8_RECIPE.replace("/v2", "/v3"))
    assert other.combined_hash != quantized.combined_hash
    assert "quantize" not in base.to_json()


def test_loading_int8_and_the_manifest_command_agree(llama_dir: Path) -> None:
    """The node hashes while it loads and quantizes; `teeshard manifest` only reads files."""
    checkpoint, layers = Checkpoint(llama_dir), LayerRange(1, 3)
    builder = ManifestBuilder(checkpoint, layers, "bfloat16", quantize="int8")
    load_shard(checkpoint, layers, torch.bfloat16, on_tensor=builder.on_tensor, quantize="int8")
    hooked = builder.finish()
    standalone = compute_manifest(checkpoint, layers, "bfloat16", quantize="int8")
    assert hooked == standalone and hooked.quantize == INT8_RECIPE
    assert hooked.combined_hash != compute_manifest(checkpoint, layers, "bfloat16").combined_hash


def test_w8a8_pins_its_own_recipe_over_the_same_weights(llama_dir: Path) -> None:
    """w8a8 loads exactly int8's weights and scales, but computes differently: the
    manifest names its own recipe, so a verifier expecting int8 refuses a w8a8 node."""
    checkpoint, layers = Checkpoint(llama_dir), LayerRange(1, 3)
    builder = ManifestBuilder(checkpoint, layers, "bfloat16", quantize="w8a8")
    w8a8 = load_shard(
        checkpoint, layers, torch.bfloat16, on_tensor=builder.on_tensor, quantize="w8a8"
    )
    hooked = builder.finish()
    assert hooked == compute_manifest(checkpoint, layers, "bfloat16", quantize="w8a8")
    assert hooked.quantize == W8A8_RECIPE
    int8 = compute_manifest(checkpoint, layers, "bfloat16", quantize="int8")
    assert hooked.combined_hash != int8.combined_hash
    int8_shard = load_shard(checkpoint, layers, torch.bfloat16, quantize="int8")
    int8_layers = dict(int8_shard.named_modules())
    quantized = [(n, m) for n, m in w8a8.named_modules() if isinstance(m, Int8Linear)]
    assert quantized
    for name, layer in quantized:  # the same weights and scales, whatever each kernel's layout
        twin = int8_layers[name]
        assert isinstance(twin, Int8Linear)
        assert torch.equal(layer.stored_weight(), twin.stored_weight()), name
        assert torch.equal(layer.scales, twin.scales), name


def test_quantize_round_trips_and_cannot_be_stripped(llama_dir: Path) -> None:
    manifest = compute_manifest(
        Checkpoint(llama_dir), LayerRange(0, 2), "bfloat16", quantize="int8"
    )
    data = json.loads(json.dumps(manifest.to_json()))
    assert data["quantize"] == INT8_RECIPE
    assert ShardManifest.from_json(data) == manifest
    stripped = {k: v for k, v in data.items() if k != "quantize"}
    with pytest.raises(FormatError, match="combined_hash does not match"):
        ShardManifest.from_json(stripped)
    with pytest.raises(FormatError, match="quantize: expected a string"):
        ShardManifest.from_json({**data, "quantize": 8})


def test_an_unknown_quantization_is_refused(llama_dir: Path) -> None:
    with pytest.raises(ManifestError, match="int4"):
        compute_manifest(Checkpoint(llama_dir), LayerRange(0, 2), "bfloat16", quantize="int4")
