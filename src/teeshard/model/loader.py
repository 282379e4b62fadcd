"""Load one shard of a checkpoint: skeleton on the meta device, then only its tensors.

A node's memory after loading is its share of the weights; the rest of the
checkpoint is never read. Every expected parameter must arrive with the
expected shape, and nothing unexpected is accepted. A number format
(:mod:`teeshard.model.formats`) is applied as a transformation: on the skeleton
before loading (int8 layers), per tensor while loading (conversion,
quantization from the stored precision), and on the loaded shard (oneDNN packing).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from teeshard.model.checkpoint import Checkpoint, CheckpointError
from teeshard.model.formats import (
    DTYPES,
    NumberFormat,
    finish_loaded,
    load_tensor,
    prepare_skeleton,
)
from teeshard.model.layer_range import LayerRange
from teeshard.model.native import attention, huge_pages
from teeshard.model.transformer import Shard

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

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
    quantize: str | None = None,
    pack: bool = True,
) -> Shard:
    """Layers ``layers`` computing in ``dtype``; ``quantize="int8"`` or ``"w8a8"``: int8 linears.

    ``pack``: repack linears for oneDNN (the fast CPU path); False keeps plain
    ``nn.Linear`` modules, for a shard whose linears are offloaded next (TSQP)."""
    spec = checkpoint.spec
    fmt = NumberFormat(_DTYPE_NAMES[dtype], quantize)
    with torch.device("meta"):
        shard = Shard(spec, layers)
        prepare_skeleton(shard, fmt)
    expected = {name: tuple(p.shape) for name, p in shard.named_parameters(remove_duplicate=False)}
    expected.update((name, tuple(b.shape)) for name, b in shard.named_buffers())
    keys = checkpoint.keys_for(layers)
    lm_head_key = checkpoint.lm_head_key()

    state: dict[str, torch.Tensor] = {}
    for key, stored in checkpoint.iter_tensors(keys):
        if on_tensor is not None:
            on_tensor(key, stored)
        tensor = stored.to(device=device)
        for name in shard_param_name(key, layers, lm_head_key, shard.is_last):
            if name not in expected:
                raise CheckpointError(f"unexpected tensor {key} for layers {layers}")
            if tuple(tensor.shape) != expected[name]:
                raise CheckpointError(
                    f"{key}: shape {tuple(tensor.shape)} in checkpoint, {expected[name]} expected"
                )
            state.update(load_tensor(name, tensor, fmt))
        if progress is not None:
            progress(checkpoint.tensors[key].nbytes)

    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(
            f"checkpoint {checkpoint.dir} lacks weights for: {', '.join(missing[:5])}"
        )
    shard.load_state_dict(state, strict=True, assign=True)
    state.clear()  # the shard holds the only reference: repacking frees each weight it replaces
    shard.eval()
    shard.requires_grad_(False)
    shard.number_format, shard.compute_dtype = fmt, fmt.torch_dtype
    if pack:
        finish_loaded(shard, fmt)
    huge_pages.release_freed_heap()  # the stored bytes laid out anew, the sources quantized
    # the native decode attention, if it runs here, is built now and not by the first
    # decode step (its compiler run would count against that step's timeout)
    shard.native_attention &= attention.supports(shard.compute_dtype, shard.device, spec.head_dim)
    return shard
