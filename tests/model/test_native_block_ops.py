"""The native RMS norm, rotary pass and SwiGLU: torch's results (rotary bit for bit,
the others within a rounding or two), each row independent of its batch-mates, torch's operators kept
wherever the kernel does not take the tensors, and a shard running them generating
what torch's operators generate."""

from __future__ import annotations

import pytest
import torch

from teeshard.model import native
from teeshard.model.checkpoint import Checkpoint
from teeshard.model.layer_range import LayerRange
from teeshard.model.loader import load_shard
from teeshard.model.native import block_ops
from teeshard.model.transformer import BLOCK_OPS_ENV, MLP, Attention, RMSNorm, apply_rope
from tests.checkpoints import TinyModel

pytestmark = pytest.mark.skipif(
    not native.available(), reason=f"no native kernels here: {native.unavailable_reason()}"
)


def torch_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("width", [2048, 64, 37, 8])
def test_norm_is_torch_s_within_a_rounding(width: int) -> None:
    x = torch.randn(1, 6, width) * torch.logspace(-3, 3, 6)[None, :, None]
    weight = torch.randn(width)
    got = block_ops.rms_norm(x, weight, 1e-5)
    assert got is not None and got.shape == x.shape and got.dtype == torch.float32
    want = torch_norm(x, weight, 1e-5)
    # the sum of squares in another order: the scale within a few roundings
    assert torch.allclose(got, want, rtol=4 * 2**-23, atol=0)
    assert not torch.equal(got, x)


def test_norm_of_a_row_does_not_depend_on_its_batch_mates() -> None:
    x, weight = torch.randn(1, 9, 2048), torch.randn(2048)
    batch = block_ops.rms_norm(x, weight, 1e-6)
    assert batch is not None
    for row in range(9):
        alone = block_ops.rms_norm(x[:, row : row + 1].contiguous(), weight, 1e-6)
        assert alone is not None and torch.equal(alone, batch[:, row : row + 1])


def test_a_zero_row_and_eps() -> None:
    x = torch.zeros(1, 2, 16)
    x[0, 1] = 3.0
    got = block_ops.rms_norm(x, torch.ones(16), 0.25)
    assert got is not None
    assert not bool(got[0, 0].any())  # 0 * 1 / sqrt(eps)
    assert torch.allclose(got[0, 1], torch.full((16,), 3.0 / (9.25**0.5)))


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(32, 4, 64), (4, 2, 16), (3, 1, 6)])
@pytest.mark.parametrize("rows", [1, 5])
def test_rotary_is_torch_s_bit_for_bit(rows: int, heads: int, kv_heads: int, head_dim: int) -> None:
    """On a slice of a fused q/k/v product, as the attention takes it; head sizes whose
    half is no multiple of 8 take the kernel's scalar path."""
    qkv = torch.randn(1, rows, heads + 2 * kv_heads, head_dim)
    qk = qkv[:, :, : heads + kv_heads]
    angles = torch.rand(rows, head_dim // 2) * 100
    cos = torch.cat([angles.cos()] * 2, dim=-1)[:, None, :]
    sin = torch.cat([angles.sin()] * 2, dim=-1)[:, None, :]
    got = block_ops.rope(qk, cos, sin)
    assert got is not None and got.is_contiguous()
    assert torch.equal(got, apply_rope(qk, cos, sin))


@pytest.mark.parametrize("width", [5632, 20])
def test_swiglu_is_torch_s_within_two_roundings(width: int) -> None:
    """Gates from -100 to 100 (e^-g clamped where it would overflow); widths that are
    no multiple of 8 end on the kernel's scalar path."""
    gate_up = torch.randn(1, 3, 2 * width) * 4
    gate_up[0, 0, :8] = torch.tensor([-100.0, -88.5, -20.0, -1e-3, 0.0, 1e-3, 30.0, 100.0])
    got = block_ops.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    assert got is not None and got.shape == want.shape
    # (far below a gate of -87 both are 0 to within 1e-35: e^-g is clamped there)
    assert torch.allclose(got, want, rtol=8 * 2**-23, atol=1e-35)
    alone = block_ops.silu_mul(gate_up[:, 1:2].contiguous())
    assert alone is not None and torch.equal(alone, got[:, 1:2])  # rows independent


def test_tensors_the_kernels_do_not_take_are_left_to_torch() -> None:
    x, weight = torch.randn(1, 3, 64), torch.randn(64)
    assert block_ops.rms_norm(x.to(torch.bfloat16), weight, 1e-5) is None
    assert block_ops.rms_norm(torch.randn(1, 64, 3).transpose(1, 2), weight, 1e-5) is None
    assert block_ops.rms_norm(x, weight[:32], 1e-5) is None
    cos = sin = torch.ones(3, 1, 16)
    q = torch.randn(1, 3, 4, 16)
    assert block_ops.rope(q.to(torch.bfloat16), cos, sin) is None
    assert block_ops.rope(q.transpose(2, 3), cos, sin) is None  # heads not contiguous
    assert block_ops.rope(q, cos[:2], sin[:2]) is None
    assert block_ops.silu_mul(q.to(torch.bfloat16)) is None
    assert block_ops.silu_mul(q.transpose(2, 3)) is None
    assert block_ops.silu_mul(torch.randn(3, 5)) is None  # no gate/up halves
    # and the modules fall back to torch's operators for them
    norm = RMSNorm(64, 1e-5)
    norm.weight.data = weight
    half = x.to(torch.bfloat16)
    assert torch.equal(norm(half), torch_norm(half.float(), weight, 1e-5))


def test_shard_generates_what_torch_s_operators_generate(
    tiny_model: TinyModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint, layers = Checkpoint(tiny_model.path), LayerRange(0, tiny_model.num_layers)
    native_shard = load_shard(checkpoint, layers)
    monkeypatch.setenv(BLOCK_OPS_ENV, "torch")
    torch_shard = load_shard(checkpoint, layers)
    modules = [m for m in torch_shard.modules() if isinstance(m, (RMSNorm, Attention, MLP))]
    assert modules and not any(m.native_ops for m in modules)
    monkeypatch.setenv(BLOCK_OPS_ENV, "sometimes")
    with pytest.raises(ValueError, match="native or torch"):
        load_shard(checkpoint, layers)
    outputs = []
    for shard in (native_shard, torch_shard):
        cache, tokens, logits = shard.new_cache(64), [5, 9, 2], []
        with torch.no_grad():
            step = shard(shard.embed(torch.tensor([tokens])), cache)
            for _ in range(40):
                logits.append(step)
                tokens.append(int(step.argmax()))
                step = shard(shard.embed(torch.tensor([[tokens[-1]]])), cache)
        outputs.append((tokens, torch.cat(logits)))
    (native_tokens, native_logits), (torch_tokens, torch_logits) = outputs
    assert native_tokens == torch_tokens
    assert (native_logits - torch_logits).abs().max().item() <= 1e-5
