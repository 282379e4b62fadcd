"""Load one shard of a checkpoint: skeleton on the meta device, then only its tensors.

A node's memory after loading is its share of the weights; the rest of the
checkpoint is never read. Every expected parameter must arrive with the
expected shape, and nothing unexpected is accepted.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from teeshard.model.checkpoint import Checkpoint, CheckpointError
from teeshard.model.layer_range import LayerRange
from teeshard.model.transformer import Shard

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Called with (checkpoint key, tensor exactly as stored) for every tensor loaded,
# before any dtype conversion: the manifest hashes what is on disk.
TensorHook = Callable[[str, torch.Tensor], None]


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)}") from None


def shard_param_name(key: str, layers: LayerRange, lm_head_key: str, is_last: bool) -> list[str]:
    """Map a checkpoint key to the shard's parameter name(s) it fills."""
    names: list[str] = []
    if key == "model.embed_tokens.weight" and layers.is_first():
        names.append("embed_tokens.weight")
    if key == lm_head_key and is_last:
        names.append("lm_head.weight")
    if key == "model.norm.weight":
        names.append("norm.weight")
    match = _LAYER_KEY.match(key)
    if match:
        names.append(f"layers.{int(match.group(1)) - layers.start}.{match.group(2)}")
    return names


def load_shard(
    checkpoint: Checkpoint,
    layers: LayerRange,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    on_tensor: TensorHook | None = None,
    progress: Callable[[int], None] | None = None,
) -> Shard:
    spec = checkpoint.spec
    with torch.device("meta"):
        shard = Shard(spec, layers)
    expected = {name: tuple(p.shape) for name, p in shard.named_parameters(remove_duplicate=False)}
    keys = checkpoint.keys_for(layers)
    lm_head_key = checkpoint.lm_head_key()

    state: dict[str, torch.Tensor] = {}
    for key, stored in checkpoint.iter_tensors(keys):
        if on_tensor is not None:
            on_tensor(key, stored)
        tensor = stored.to(device=device, dtype=dtype)
        for name in shard_param_name(key, layers, lm_head_key, shard.is_last):
            if name not in expected:
                raise CheckpointError(f"unexpected tensor {key} for layers {layers}")
            if tuple(tensor.shape) != expected[name]:
                raise CheckpointError(
                    f"{key}: shape {tuple(tensor.shape)} in checkpoint, {expected[name]} expected"
                )
            state[name] = tensor
        if progress is not None:
            progress(checkpoint.tensors[key].nbytes)

    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(
            f"checkpoint {checkpoint.dir} lacks weights for: {', '.join(missing[:5])}"
        )
    shard.load_state_dict(state, strict=True, assign=True)
    shard.eval()
    shard.requires_grad_(False)
    return shard
