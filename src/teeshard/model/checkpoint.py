"""A Hugging Face checkpoint directory, read by tensor key.

Works with a single ``model.safetensors`` or sharded files listed in
``model.safetensors.index.json``. Only headers are read until a tensor is asked
for, so a node can plan and load its own slice without touching the rest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from teeshard.model.layer_range import LayerRange
from teeshard.model.spec import ArchSpec

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")

DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


class CheckpointError(ValueError):
    """The checkpoint directory is missing files or tensors, or has wrong shapes."""


@dataclass(frozen=True)
class TensorInfo:
    key: str
    file: Path
    dtype: str  # safetensors dtype name, e.g. "F32"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * DTYPE_SIZES.get(self.dtype, 4)


class Checkpoint:
    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"model directory {self.dir} does not exist")
        self.spec = ArchSpec.from_dir(self.dir)
        self.tensors = self._read_headers()

    @property
    def name(self) -> str:
        return self.dir.name

    def _weight_files(self) -> list[Path]:
        index = self.dir / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return sorted({self.dir / name for name in weight_map.values()})
        single = self.dir / SINGLE_NAME
        if single.is_file():
            return [single]
        found = sorted(self.dir.glob("*.safetensors"))
        if not found:
            raise CheckpointError(
                f"no *.safetensors files in {self.dir} (PyTorch .bin checkpoints are refused: "
                "they are pickles; convert them to safetensors first)"
            )
        return found

    def _read_headers(self) -> dict[str, TensorInfo]:
        tensors: dict[str, TensorInfo] = {}
        for file in self._weight_files():
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    piece = handle.get_slice(key)
                    tensors[key] = TensorInfo(
                        key, file, piece.get_dtype(), tuple(piece.get_shape())
                    )
        return tensors

    def keys_for(self, layers: LayerRange) -> list[str]:
        """Every checkpoint key a node serving ``layers`` needs, in a stable order."""
        spec = self.spec
        layers.check_within(spec.num_layers)
        keys: list[str] = []
        if layers.is_first():
            keys.append("model.embed_tokens.weight")
        for key in sorted(self.tensors):
            match = _LAYER_KEY.match(key)
            if match and int(match.group(1)) in layers:
                keys.append(key)
        if layers.is_last(spec.num_layers):
            keys.append("model.norm.weight")
            keys.append(self.lm_head_key())
        missing = [k for k in keys if k not in self.tensors]
        if missing:
            raise CheckpointError(f"checkpoint {self.dir} lacks tensors: {', '.join(missing[:5])}")
        return list(dict.fromkeys(keys))

    def lm_head_key(self) -> str:
        if "lm_head.weight" in self.tensors and not self.spec.tie_word_embeddings:
            return "lm_head.weight"
        return "model.embed_tokens.weight"

    def nbytes(self, keys: Iterable[str]) -> int:
        return sum(self.tensors[k].nbytes for k in keys)

    def layer_nbytes(self, layer: int) -> int:
        prefix = f"model.layers.{layer}."
        return sum(t.nbytes for k, t in self.tensors.items() if k.startswith(prefix))

    def iter_tensors(self, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, tensor)`` for ``keys``, opening each file once.

        Each tensor is copied out of the memory map into private memory: safetensors
        hands out views of the mapped file, and a node must compute with exactly the
        bytes it hashed for its manifest, not with a file that may change later.
        """
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.tensors[key].file, []).append(key)
        for file, file_keys in by_file.items():
            with safe_open(str(file), framework="pt") as handle:
                for key in file_keys:
                    yield key, handle.get_tensor(key).clone()
