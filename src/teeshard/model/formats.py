"""Number formats: what a shard's weights are stored and computed in, and the fast kernels.

A format is a compute dtype (``float32``, ``float16``, ``bfloat16``) and optionally
a weight quantization (:mod:`teeshard.model.quantize`: ``int8``, the block linears
and the LM head, their input rows in float32, or quantized per row to 16 bits on the
AVX-512 VNNI kernel, or bfloat16 on torch's; ``w8a8``, the same int8 weights, each
product's input rows quantized to int8). Whatever the format,
precision-sensitive work stays in float32 (see :mod:`teeshard.model.transformer`):
the residual stream between blocks, RMSNorm (its weights are kept in float32),
rotary embedding, the softmax inside attention, and everything after the logits
(softmax, log-probabilities, penalties, sampling). The block linears, the
embedding, the KV cache and the LM head use the compute dtype, except that float16
keeps a float32 head (no fast float16 product on CPUs), and int8 and w8a8 quantize
the head like the block linears. So bfloat16 logits are a bfloat16 product
(float32 accumulation; rounded to bfloat16 once where oneDNN computes them, as in
Hugging Face's bfloat16 models; float32 from teeshard's kernels). For TinyLlama a
float32 head would be an eighth of the bytes the whole bfloat16 model reads per
token; a bfloat16 head was a tenth of the int8 model's, and on a CPU without BF16
instructions it took torch's generic path, whose batches cost a product per row.

Applied as a transformation (gpt-fast style): :func:`prepare_skeleton` swaps block
linears and the head for :class:`~teeshard.model.quantize.Int8Linear` before
loading, and :func:`finish_loaded` gives the other linears their kernel after it:
teeshard's bfloat16 kernel where the CPU has AVX-512 BF16
(:class:`~teeshard.model.linears.NativeBf16Linear`) and its float32 kernel where it
has AVX-512 (:class:`~teeshard.model.linears.NativeF32Linear`), else oneDNN's packed
product (:class:`~teeshard.model.linears.PackedLinear`). The model code does not
know which format it runs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from teeshard.model import native
from teeshard.model.linears import NativeBf16Linear, NativeF32Linear, PackedLinear
from teeshard.model.quantize import (
    QUANTIZE_RECIPES,
    Int8Linear,
    W8A8Linear,
    choose_int8_kernel,
    choose_w8a8_kernel,
    quantize_int8,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
QUANTIZE_CHOICES = tuple(QUANTIZE_RECIPES)
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# products that read the same input, stacked into one: (owner in a block, fused name, members)
_FUSED = (
    ("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
    ("mlp", "gate_up_proj", ("gate_proj", "up_proj")),
)
_FUSED_LINEARS = tuple(fused for _, fused, _ in _FUSED)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NumberFormat:
    dtype: str = "float32"  # compute dtype of the block linears, embedding and KV cache
    # "int8": block linears and LM head in int8 (activations as the kernel takes them:
    # quantize.py); "w8a8": the same weights, each product's input rows quantized to int8
    quantize: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.quantize is not None and self.quantize not in QUANTIZE_RECIPES:
            raise ValueError(
                f"quantization {self.quantize!r} is not one of {', '.join(QUANTIZE_CHOICES)}"
            )
        if self.quantize is not None and self.dtype != "bfloat16":
            raise ValueError(
                f"--quantize {self.quantize} keeps bfloat16 for the rest of the block "
                "(attention, KV cache): --dtype bfloat16"
            )

    @classmethod
    def resolve(cls, dtype: str | None, quantize: str | None) -> NumberFormat:
        """``--dtype`` and ``--quantize`` as given; no dtype means float32, or bfloat16 for int8."""
        if dtype is None:
            dtype = "bfloat16" if quantize is not None else "float32"
        return cls(dtype, quantize)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def recipe(self) -> str | None:
        """The versioned quantization recipe the manifest names, if any."""
        return QUANTIZE_RECIPES[self.quantize] if self.quantize is not None else None

    @property
    def label(self) -> str:
        return self.quantize or self.dtype

    def param_dtype(self, name: str) -> torch.dtype:
        """What a shard parameter is stored in (``name`` as in ``Shard.named_parameters``)."""
        if name.endswith("norm.weight"):
            return torch.float32  # norms in float32, whatever the format
        if name.startswith("lm_head."):
            return self.head_dtype
        return self.torch_dtype

    @property
    def head_dtype(self) -> torch.dtype:
        """The LM head's dtype where it is not quantized (its bias's where it is):
        bfloat16 in the bfloat16 formats, else float32."""
        return torch.bfloat16 if self.dtype == "bfloat16" else torch.float32

    def quantizes(self, name: str) -> bool:
        """Whether this format stores shard parameter ``name`` quantized."""
        return self.quantize is not None and is_quantized_weight(name)

    def param_bytes(self, name: str, shape: tuple[int, ...]) -> int:
        """Bytes a node holds for one shard parameter in this format (int8 scales included)."""
        count = 1
        for dim in shape:
            count *= dim
        if self.quantizes(name):
            return count + shape[0] * 2  # int8 weight plus one bfloat16 scale per channel
        if self.param_dtype(name) == torch.float32:
            return count * 4
        return count * _DTYPE_BYTES[self.dtype]


FORMATS = {  # what `teeshard plan` and the benchmark compare
    "float32": NumberFormat("float32"),
    "bfloat16": NumberFormat("bfloat16"),
    "int8": NumberFormat("bfloat16", "int8"),
    "w8a8": NumberFormat("bfloat16", "w8a8"),
}


def is_block_linear_weight(name: str) -> bool:
    """``layers.N.self_attn.q_proj.weight`` and the like."""
    parts = name.split(".")
    return len(parts) >= 3 and parts[-1] == "weight" and parts[-2] in _BLOCK_LINEARS


def is_quantized_weight(name: str) -> bool:
    """What int8 quantizes: the block linears' weights and the LM head's (recipe v2)."""
    return is_block_linear_weight(name) or name == "lm_head.weight"


def onednn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available())


def onednn_bf16_available() -> bool:
    return bool(
        torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def _block_linears(shard: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    found = []
    for module in shard.modules():
        for child_name, child in module.named_children():
            if child_name in _BLOCK_LINEARS + _FUSED_LINEARS and isinstance(child, nn.Linear):
                found.append((module, child_name, child))
    return found


def stack_linears(members: list[nn.Module]) -> nn.Module | None:
    """One module computing ``members``' products side by side (their outputs
    concatenated), or None where they are not all plain linears or all int8 ones.

    Stacking changes no number: each output channel keeps its own weights (and, in
    int8, its own scale), and a product's channels do not interact."""
    kind = type(members[0])
    if not issubclass(kind, nn.Linear | Int8Linear) or any(type(m) is not kind for m in members):
        return None
    layers: list[nn.Linear | Int8Linear] = [m for m in members if isinstance(m, kind)]
    biases = [layer.bias for layer in layers]
    if any(b is None for b in biases) and any(b is not None for b in biases):
        return None
    bias = torch.cat([b for b in biases if b is not None]) if biases[0] is not None else None
    weight = torch.cat([layer.weight for layer in layers])
    in_features, width = layers[0].in_features, weight.shape[0]
    if issubclass(kind, Int8Linear):
        int8 = kind(in_features, width, bias is not None)
        int8.weight = weight
        int8.scales = torch.cat([layer.scales for layer in layers if isinstance(layer, Int8Linear)])
        int8.bias = bias
        return int8
    linear = kind(in_features, width, bias=bias is not None, device="meta", dtype=weight.dtype)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


def fuse_projections(shard: nn.Module) -> None:
    """q/k/v, and gate/up, read the same normalised input: each set becomes one stacked
    product (``qkv_proj``, ``gate_up_proj``), so a decode step makes four products per
    layer instead of seven, with fewer dispatches and wider, more efficient kernels."""
    for block in getattr(shard, "layers", ()):
        for owner_name, fused_name, names in _FUSED:
            owner = getattr(block, owner_name)
            if getattr(owner, fused_name, None) is not None:
                continue
            members = [getattr(owner, name) for name in names]
            fused = stack_linears(members)
            if fused is None:
                continue
            setattr(owner, fused_name, fused)
            for name in names:
                delattr(owner, name)


def prepare_skeleton(shard: nn.Module, fmt: NumberFormat) -> None:
    """Before loading (meta device): the quantized formats get :class:`Int8Linear`
    (``w8a8``: :class:`W8A8Linear`) block linears and LM head."""
    if fmt.quantize is not None:
        layer = W8A8Linear if fmt.quantize == "w8a8" else Int8Linear
        for parent, name, linear in _block_linears(shard):
            setattr(parent, name, layer.like(linear))
        head = getattr(shard, "lm_head", None)
        if isinstance(head, nn.Linear):
            shard.lm_head = layer.like(head)


def load_tensor(name: str, stored: torch.Tensor, fmt: NumberFormat) -> dict[str, torch.Tensor]:
    """The shard tensors one checkpoint tensor becomes: converted, or int8 plus scales."""
    if fmt.quantizes(name):
        q, scales = quantize_int8(stored)  # from the stored precision, never a rounded copy
        return {name: q, name.removesuffix("weight") + "scales": scales}
    return {name: stored.to(fmt.param_dtype(name))}


def _packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN's packed product is the fast path for linears in ``dtype`` here."""
    if dtype == torch.bfloat16:
        return onednn_bf16_available()
    return dtype == torch.float32


def finish_loaded(shard: nn.Module, fmt: NumberFormat) -> None:
    """After loading: q/k/v and gate/up fused (:func:`fuse_projections`); on the CPU,
    int8 layers given the faster int8 kernel here (:func:`choose_int8_kernel`),
    bfloat16 and float32 linears teeshard's kernels where they serve
    (:func:`_bfloat16_linears`, :func:`_float32_linears`), and the other linears
    repacked for oneDNN where it is available.

    Those are block linears that are not quantized and the LM head, in float32, or in
    bfloat16 with BF16 instructions. For float32 the reason is batching: torch's
    default float32 product (MKL) takes 2.2-3x as long for 8 rows as for 1 here,
    while oneDNN's packed product takes 1.25-1.4x, and less than MKL's for 1 row (one
    thread, TinyLlama's shapes: ``benchmarks/linear_rows.py``).
    """
    fuse_projections(shard)
    if fmt.dtype == "bfloat16":
        _bfloat16_linears(shard, fmt)
    _float32_linears(shard, fmt)
    int8_layers = [m for m in shard.modules() if isinstance(m, Int8Linear)]
    if int8_layers and int8_layers[0].weight.device.type == "cpu":
        if fmt.quantize == "w8a8":
            choose_w8a8_kernel([m for m in int8_layers if isinstance(m, W8A8Linear)])
        else:
            choose_int8_kernel(int8_layers)
    if not onednn_available():
        return
    if fmt.quantize is None and _packs(fmt.torch_dtype):
        for parent, name, linear in _block_linears(shard):
            if linear.weight.device.type == "cpu":
                setattr(parent, name, PackedLinear(linear, fmt.torch_dtype))
    head = getattr(shard, "lm_head", None)
    if (
        isinstance(head, nn.Linear)
        and head.weight.device.type == "cpu"
        and _packs(head.weight.dtype)  # else the plain linear stays
    ):
        shard.lm_head = PackedLinear(head, head.weight.dtype)


BF16_KERNEL_ENV = "TEESHARD_BF16_KERNEL"  # auto (the default) or onednn
F32_KERNEL_ENV = "TEESHARD_F32_KERNEL"  # auto (the default) or onednn


def _kernel_wanted(variable: str) -> str:
    """``auto`` (teeshard's kernel where it serves) or ``onednn``, from ``$variable``."""
    wanted = os.environ.get(variable, "auto")
    if wanted not in ("auto", "onednn"):
        raise ValueError(f"{variable}={wanted!r}: choose auto or onednn")
    return wanted


def _float32_linears(shard: nn.Module, fmt: NumberFormat) -> None:
    """float32 linears (the float32 format's block linears, and a float32 LM head) on
    teeshard's AVX-512 kernel where the CPU runs it and a layer fits it
    (:class:`NativeF32Linear`; ``$TEESHARD_F32_KERNEL=onednn`` keeps oneDNN's packed
    product, for comparison); the rest stay for :func:`finish_loaded` to pack."""
    if _kernel_wanted(F32_KERNEL_ENV) == "onednn":
        return
    linears = _block_linears(shard) if fmt.torch_dtype == torch.float32 else []
    head = getattr(shard, "lm_head", None)
    if isinstance(head, nn.Linear) and head.weight.dtype == torch.float32:
        linears.append((shard, "lm_head", head))
    taken = 0
    for parent, name, linear in linears:
        if NativeF32Linear.fits(linear):
            setattr(parent, name, NativeF32Linear(linear))
            taken += 1
    if taken:
        log.info("%d float32 linears: teeshard's AVX-512 kernel", taken)


def _bfloat16_linears(shard: nn.Module, fmt: NumberFormat) -> None:
    """The bfloat16 linears' kernel: teeshard's AVX-512 BF16 kernel where the CPU has
    those instructions but no AMX, and a layer fits it (it reads the weight faster
    than oneDNN's packed product and keeps pace at prefill;
    ``$TEESHARD_BF16_KERNEL=onednn`` keeps oneDNN's, for comparison), oneDNN's packed
    product for the rest (:func:`finish_loaded`; with AMX it prefills several times
    faster), and without BF16 instructions :func:`_without_bf16_instructions`."""
    wanted = _kernel_wanted(BF16_KERNEL_ENV)
    if not onednn_bf16_available():
        _without_bf16_instructions(shard, fmt)
        return
    if wanted == "onednn":
        return
    if "amx_bf16" in native.cpu_info()[1]:
        return  # oneDNN prefills on AMX, several times faster than any AVX-512 kernel
    taken = 0
    for parent, name, linear in _bfloat16_products(shard, fmt):
        if NativeBf16Linear.isa_for(linear) == "avx512bf16":  # the AVX2 one loses to oneDNN
            setattr(parent, name, NativeBf16Linear(linear))
            taken += 1
    if taken:
        log.info("%d bfloat16 linears: teeshard's AVX-512 BF16 kernel", taken)


def _bfloat16_products(
    shard: nn.Module, fmt: NumberFormat
) -> list[tuple[nn.Module, str, nn.Linear]]:
    """The plain bfloat16 linears: the block linears unless quantized, and the head."""
    linears = _block_linears(shard) if fmt.quantize is None else []
    head = getattr(shard, "lm_head", None)
    if isinstance(head, nn.Linear):
        linears.append((shard, "lm_head", head))
    return linears


def _without_bf16_instructions(shard: nn.Module, fmt: NumberFormat) -> None:
    """bfloat16 linears on a CPU where oneDNN has no bfloat16 path: teeshard's AVX2
    kernel where it fits (:class:`NativeBf16Linear`), else torch's generic product."""
    linears = _bfloat16_products(shard, fmt)
    native_ones = [(p, n, lin) for p, n, lin in linears if NativeBf16Linear.fits(lin)]
    for parent, name, linear in native_ones:
        setattr(parent, name, NativeBf16Linear(linear))
    if native_ones:
        log.info("%d bfloat16 linears: teeshard's AVX2 kernel (no BF16 instructions here)",
                 len(native_ones))  # fmt: skip
    if len(native_ones) < len(linears):
        reason = native.unavailable_reason() or "a layer's shape does not fit the kernel"
        log.warning(
            "this CPU has no bfloat16 instructions oneDNN uses (AVX-512 BF16 or "
            "AVX-NE-CONVERT), and %d of %d bfloat16 linears cannot take teeshard's AVX2 "
            "kernel (%s): they take torch's generic path, whose batches cost about one "
            "product per row; --quantize int8 or --dtype float32 serve batches faster here",
            len(linears) - len(native_ones), len(linears), reason,
        )  # fmt: skip
