"""Load one shard of a checkpoint: skeleton on the meta device, then only its tensors.

A node's memory after loading is its share of the weights; the rest of the
checkpoint is never read. Every expected parameter must arrive with the
expected shape, and nothing unexpected is accepted. A number format
(:mod:`teeshard.model.formats`) is applied as a transformation: on the skeleton
before loading (int8 layers), per tensor while loading (conversion,
quantization from the stored precision), and on the loaded shard (oneDNN packing).
"""

from __future__ import annotations

import ctypes
import functools
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
from teeshard.model.native import attention
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
    release_freed_heap()  # the stored bytes laid out anew, the sources quantized
    # the native decode attention, if it runs here, is built now and not by the first
    # decode step (its compiler run would count against that step's timeout)
    shard.native_attention &= attention.supports(shard.compute_dtype, shard.device, spec.head_dim)
    return shard


@functools.cache
def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        trim = ctypes.CDLL(None).malloc_trim  # glibc; musl and others have none
    except (OSError, AttributeError):
        return None
    trim.restype, trim.argtypes = ctypes.c_int, [ctypes.c_size_t]
    return trim


def release_freed_heap() -> bool:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``); False where
    there is no such call.

    Loading frees a weight's stored bytes once they are laid out anew (the native
    kernels' layouts), and quantized formats free the source tensors. glibc keeps such
    freed memory in its heap and counts it in the process's resident memory until
    asked: a w8a8 TinyLlama half stayed at 1,576 MiB resident after loading (1,207 MiB
    with its weights on ordinary pages), and 959 MiB after this either way."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
