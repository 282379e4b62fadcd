"""Shard manifests: what weights a node holds, as one hash a verifier can compare.

A manifest names the model, its architecture config, the layer range, the compute
dtype and the SHA-256 of every tensor the node loaded, *as stored on disk* (the raw
little-endian bytes of the safetensors file, before any dtype conversion). Its
combined hash is SHA-256 over a canonical encoding of all of that, and goes into
the node's report_data, so a quote proves which weights the attested key serves.

Two ways to compute it, which give the same result:

* during loading, through the loader's ``on_tensor`` hook (:class:`ManifestBuilder`),
  so every byte hashed is a byte the node actually loaded;
* standalone, reading the raw tensor bytes from the files (:func:`compute_manifest`),
  as ``teeshard manifest`` does.

Either can use a :class:`~teeshard.attest.manifest_cache.ManifestCache` so that a restart
does not rehash unchanged files.

An entry node's manifest has one more section (``entry_files=`` the checkpoint
directory; only for layers starting at 0): its tokenizer, chat templates and
generation config (:class:`~teeshard.attest.entry_files.EntryFiles`). Its hash is
appended to the canonical bytes as ``lp("entry") || lp(section hash)``, so the
combined hash covers it; a shard manifest without the section encodes as before.

A quantized node's manifest names its quantization recipe (``quantize=`` e.g.
:data:`~teeshard.model.quantize.INT8_RECIPE`), appended the same way as
``lp("quantize") || lp(recipe)``; unquantized manifests encode as before. Why the
source tensors plus the recipe rather than the int8 tensors themselves: the recipe
is a versioned, deterministic function of the source bytes (tested bit for bit),
and its code is part of the measured image, so source hashes plus its name pin
exactly the int8 weights and scales the node computes with; a verifier gets the
expected hash from the published checkpoint without running any quantization
(so without depending on torch's numerics), and the tensor-hash cache still works.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import torch

from teeshard.attest.encoding import (
    canonical_json,
    check_fields,
    encode,
    from_hex,
    get_str,
    lp,
    u32,
    u64,
)
from teeshard.attest.entry_files import EntryFiles, hash_entry_files
from teeshard.attest.errors import FormatError, ManifestError
from teeshard.attest.manifest_cache import ManifestCache
from teeshard.model.checkpoint import Checkpoint
from teeshard.model.layer_range import LayerRange
from teeshard.model.quantize import QUANTIZE_RECIPES

_DOMAIN = b"teeshard/manifest/v1\0"
_OFFLOAD_DOMAIN = b"teeshard/manifest-offload/v1\0"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class TensorDigest:
    key: str
    dtype: str  # safetensors dtype name as stored, e.g. "BF16"
    shape: tuple[int, ...]
    sha256: bytes

    def encode(self) -> bytes:
        dims = b"".join(u64(d) for d in self.shape)
        return (
            lp(self.key.encode())
            + lp(self.dtype.encode())
            + u32(len(self.shape))
            + dims
            + lp(self.sha256)
        )


@dataclass(frozen=True)
class ShardManifest:
    """What one node serves. ``arch`` is the model's ArchSpec as a plain dict."""

    model: str
    arch: Mapping[str, Any]
    layers: LayerRange
    dtype: str  # the node's compute dtype, e.g. "float32"
    tensors: tuple[TensorDigest, ...]  # sorted by key
    entry: EntryFiles | None = None  # the entry node's tokenizer, templates, generation config
    # TSQP offload statement (mode, accelerator key fingerprints; see teeshard.offload),
    # None for a node that computes everything itself. Covered by combined_hash.
    offload: Mapping[str, Any] | None = None
    quantize: str | None = None  # versioned quantization recipe applied to the tensors, if any

    def __post_init__(self) -> None:
        # Normalise to plain JSON values (tuples become lists) so a manifest parsed
        # back from JSON compares equal to the one it was written from.
        object.__setattr__(self, "arch", json.loads(canonical_json(dict(self.arch))))
        if self.offload is not None:
            object.__setattr__(self, "offload", json.loads(canonical_json(dict(self.offload))))

    def canonical_bytes(self) -> bytes:
        return encode(
            _DOMAIN,
            lp(self.model.encode()),
            lp(canonical_json(dict(self.arch))),
            u32(self.layers.start),
            u32(self.layers.end),
            lp(self.dtype.encode()),
            u32(len(self.tensors)),
            *(t.encode() for t in self.tensors),
            lp(b"entry") + lp(self.entry.hash) if self.entry is not None else b"",
            lp(b"quantize") + lp(self.quantize.encode()) if self.quantize is not None else b"",
        )

    @property
    def weights_hash(self) -> bytes:
        """The hash of all but the offload statement: what policies and registries expect."""
        return hashlib.sha256(self.canonical_bytes()).digest()

    @property
    def combined_hash(self) -> bytes:
        """What report_data and receipts bind: the weights hash, plus the offload statement."""
        if self.offload is None:
            return self.weights_hash
        statement = lp(canonical_json(dict(self.offload)))
        return hashlib.sha256(encode(_OFFLOAD_DOMAIN, lp(self.weights_hash), statement)).digest()

    @property
    def num_layers(self) -> int | None:
        value = self.arch.get("num_layers")
        return value if isinstance(value, int) else None

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "arch": dict(self.arch),
            "layers": str(self.layers),
            "dtype": self.dtype,
            "tensors": [
                {"key": t.key, "dtype": t.dtype, "shape": list(t.shape), "sha256": t.sha256.hex()}
                for t in self.tensors
            ],
            **({"entry": self.entry.to_json()} if self.entry is not None else {}),
            **({"quantize": self.quantize} if self.quantize is not None else {}),
            "combined_hash": self.combined_hash.hex(),
            **({"offload": dict(self.offload)} if self.offload is not None else {}),
        }

    @classmethod
    def from_json(cls, data: object) -> ShardManifest:
        """Strict parse; the stated ``combined_hash`` must match the recomputed one."""
        what = "manifest"
        fields = check_fields(
            data,
            what,
            ("model", "arch", "layers", "dtype", "tensors", "combined_hash"),
            ("entry", "offload", "quantize"),
        )
        arch = fields["arch"]
        if not isinstance(arch, dict):
            raise FormatError("manifest.arch: expected a JSON object")
        try:
            layers = LayerRange.parse(get_str(fields, "layers", what))
        except ValueError as exc:
            raise FormatError(f"manifest.layers: {exc}") from None
        raw_tensors = fields["tensors"]
        if not isinstance(raw_tensors, list):
            raise FormatError("manifest.tensors: expected a list")
        tensors = tuple(_tensor_from_json(item, i) for i, item in enumerate(raw_tensors))
        if [t.key for t in tensors] != sorted({t.key for t in tensors}):
            raise FormatError("manifest.tensors: keys must be unique and sorted")
        entry = EntryFiles.from_json(fields["entry"]) if "entry" in fields else None
        if entry is not None and not layers.is_first():
            raise FormatError(
                "manifest.entry: only a shard starting at layer 0 has an entry section"
            )
        offload = fields.get("offload")
        if offload is not None and not isinstance(offload, dict):
            raise FormatError("manifest.offload: expected a JSON object")
        quantize = get_str(fields, "quantize", what) if "quantize" in fields else None
        manifest = cls(
            get_str(fields, "model", what), arch, layers, get_str(fields, "dtype", what), tensors,
            entry, offload, quantize,
        )  # fmt: skip
        stated = from_hex(fields["combined_hash"], "manifest.combined_hash", 32)
        if stated != manifest.combined_hash:
            raise FormatError("manifest.combined_hash does not match the manifest's contents")
        return manifest


def _tensor_from_json(item: object, index: int) -> TensorDigest:
    what = f"manifest.tensors[{index}]"
    fields = check_fields(item, what, ("key", "dtype", "shape", "sha256"))
    shape = fields["shape"]
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise FormatError(f"{what}.shape: expected a list of non-negative integers")
    return TensorDigest(
        get_str(fields, "key", what),
        get_str(fields, "dtype", what),
        tuple(shape),
        from_hex(fields["sha256"], f"{what}.sha256", 32),
    )


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's raw bytes in memory order (bf16 too: viewed as uint8, never converted)."""
    flat = tensor.detach().contiguous().reshape(-1)
    array: Any = flat.view(torch.uint8).numpy()
    return memoryview(array)


class ManifestBuilder:
    """Collect tensor digests through ``load_shard(..., on_tensor=builder.on_tensor)``.

    Why a hook: the manifest then hashes exactly the bytes the node loaded. With a
    cache, a tensor whose file is unchanged (same path, size and mtime) is not
    rehashed; see :class:`ManifestCache` for when that shortcut is sound.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        layers: LayerRange,
        dtype: str,
        *,
        model_name: str | None = None,
        cache: ManifestCache | None = None,
        entry_files: str | Path | None = None,
        quantize: str | None = None,
    ) -> None:
        """``entry_files``: the entry node's checkpoint directory, measured for its section;
        ``quantize``: the node's ``--quantize`` choice (``"int8"``, ``"w8a8"``), named by
        its recipe."""
        if entry_files is not None and not layers.is_first():
            raise ManifestError(f"layers {layers}: only the entry node (layer 0) has entry files")
        if quantize is not None and quantize not in QUANTIZE_RECIPES:
            raise ManifestError(
                f"quantization {quantize!r} is not one of {', '.join(QUANTIZE_RECIPES)}"
            )
        self.recipe = QUANTIZE_RECIPES[quantize] if quantize is not None else None
        self.checkpoint = checkpoint
        self.layers = layers
        self.dtype = dtype
        self.model_name = model_name or checkpoint.name
        self.cache = cache
        self.expected = checkpoint.keys_for(layers)
        self.digests: dict[str, bytes] = {}
        self.hashed_tensors = 0  # how many tensors were actually hashed (not from the cache)
        self.entry_files = entry_files

    def on_tensor(self, key: str, stored: torch.Tensor) -> None:
        info = self.checkpoint.tensors.get(key)
        if info is None or key not in self.expected:
            raise ManifestError(f"tensor {key} is not part of layers {self.layers}")
        if tuple(stored.shape) != info.shape:
            raise ManifestError(f"{key}: loaded shape {tuple(stored.shape)}, header {info.shape}")
        if key in self.digests:
            raise ManifestError(f"tensor {key} was loaded twice")
        cached = self.cache.lookup(info.file, key) if self.cache is not None else None
        if cached is None:
            cached = hashlib.sha256(tensor_bytes(stored)).digest()
            self.hashed_tensors += 1
            if self.cache is not None:
                self.cache.store(info.file, key, cached)
        self.digests[key] = cached

    def finish(self, offload: Mapping[str, Any] | None = None) -> ShardManifest:
        """The manifest; ``offload`` is the node's TSQP statement, if it offloads."""
        missing = [k for k in self.expected if k not in self.digests]
        if missing:
            raise ManifestError(f"tensors never loaded: {', '.join(missing[:5])}")
        if self.cache is not None:
            self.cache.save()
        entry = hash_entry_files(self.entry_files) if self.entry_files is not None else None
        manifest = _assemble(
            self.checkpoint, self.layers, self.dtype, self.model_name, self.digests, entry,
            self.recipe,
        )  # fmt: skip
        return manifest if offload is None else replace(manifest, offload=offload)


def compute_manifest(
    checkpoint: Checkpoint,
    layers: LayerRange,
    dtype: str,
    *,
    model_name: str | None = None,
    cache: ManifestCache | None = None,
    entry_files: str | Path | None = None,
    quantize: str | None = None,
) -> ShardManifest:
    """The manifest of ``layers``, hashing raw tensor bytes straight from the files.

    ``entry_files`` (the checkpoint directory, for an entry node) adds the entry section;
    ``quantize`` (``"int8"``, ``"w8a8"``) names the quantization recipe the node applies.
    """
    builder = ManifestBuilder(
        checkpoint, layers, dtype, model_name=model_name, cache=cache, entry_files=entry_files,
        quantize=quantize,
    )  # fmt: skip
    by_file: dict[Path, list[str]] = {}
    for key in builder.expected:
        by_file.setdefault(checkpoint.tensors[key].file, []).append(key)
    for file, keys in by_file.items():
        pending = [k for k in keys if cache is None or cache.lookup(file, k) is None]
        digests = {k: cache.lookup(file, k) for k in keys if k not in pending} if cache else {}
        if pending:
            digests.update(hash_stored_tensors(file, pending))
            builder.hashed_tensors += len(pending)
        for key in keys:
            digest = digests[key]
            assert digest is not None
            builder.digests[key] = digest
            if cache is not None:
                cache.store(file, key, digest)
    return builder.finish()


def hash_stored_tensors(file: Path, keys: list[str]) -> dict[str, bytes]:
    """SHA-256 of each tensor's byte range in a safetensors file, read in chunks."""
    with open(file, "rb") as handle:
        header, data_start = _read_safetensors_header(handle, file)
        result: dict[str, bytes] = {}
        for key in keys:
            entry = header.get(key)
            if not isinstance(entry, dict) or "data_offsets" not in entry:
                raise ManifestError(f"{file}: no tensor {key}")
            begin, end = entry["data_offsets"]
            handle.seek(data_start + begin)
            digest = hashlib.sha256()
            remaining = end - begin
            while remaining:
                chunk = handle.read(min(_CHUNK, remaining))
                if not chunk:
                    raise ManifestError(f"{file}: truncated inside tensor {key}")
                digest.update(chunk)
                remaining -= len(chunk)
            result[key] = digest.digest()
    return result


def _read_safetensors_header(handle: BinaryIO, file: Path) -> tuple[dict[str, Any], int]:
    prefix = handle.read(8)
    if len(prefix) != 8:
        raise ManifestError(f"{file}: not a safetensors file")
    (size,) = struct.unpack("<Q", prefix)
    if size > 100 << 20:
        raise ManifestError(f"{file}: safetensors header of {size} bytes is implausible")
    try:
        header = json.loads(handle.read(size))
    except ValueError:
        raise ManifestError(f"{file}: unreadable safetensors header") from None
    if not isinstance(header, dict):
        raise ManifestError(f"{file}: unreadable safetensors header")
    return header, 8 + size


def _assemble(
    checkpoint: Checkpoint,
    layers: LayerRange,
    dtype: str,
    model_name: str,
    digests: Mapping[str, bytes],
    entry: EntryFiles | None = None,
    recipe: str | None = None,
) -> ShardManifest:
    tensors = tuple(
        TensorDigest(key, checkpoint.tensors[key].dtype, checkpoint.tensors[key].shape, digest)
        for key, digest in sorted(digests.items())
    )
    spec = checkpoint.spec.to_dict()
    return ShardManifest(model_name, spec, layers, dtype, tensors, entry, quantize=recipe)
