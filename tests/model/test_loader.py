"""The shard loader reads only its own tensors and fails loudly on anything off."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from teeshard.model.checkpoint import Checkpoint, CheckpointError
from teeshard.model.layer_range import LayerRange
from teeshard.model.loader import load_shard, release_freed_heap
from teeshard.model.random_checkpoint import write_checkpoint
from teeshard.model.spec import UnsupportedModelError
from tests.checkpoints import TinyModel


def copy_model(model: TinyModel, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(model.path, target)
    return target


def test_each_node_reads_only_its_tensors(tiny_llama: TinyModel) -> None:
    checkpoint = Checkpoint(tiny_llama.path)
    seen: list[str] = []
    shard = load_shard(checkpoint, LayerRange(1, 3), on_tensor=lambda key, _: seen.append(key))
    assert all(k.startswith(("model.layers.1.", "model.layers.2.")) for k in seen)
    assert len(seen) == 2 * 9  # nine tensors per Llama block
    assert shard.embed_tokens is None and shard.lm_head is None


def test_first_and_last_shards_hold_embedding_and_head(tiny_llama: TinyModel) -> None:
    checkpoint = Checkpoint(tiny_llama.path)
    first = load_shard(checkpoint, LayerRange(0, 1), pack=False)  # plain weights, to compare
    last = load_shard(checkpoint, LayerRange(3, 4), pack=False)
    assert first.embed_tokens is not None and first.lm_head is None
    assert last.lm_head is not None and last.norm is not None and last.embed_tokens is None
    reference = load_file(str(tiny_llama.path / "model.safetensors"))
    assert torch.equal(last.lm_head.weight, reference["lm_head.weight"])


def test_sharded_checkpoint_with_index(tiny_llama: TinyModel, tmp_path: Path) -> None:
    tensors = load_file(str(tiny_llama.path / "model.safetensors"))
    config = json.loads((tiny_llama.path / "config.json").read_text())
    write_checkpoint(tmp_path, config, tensors, shard_bytes=100_000)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    whole = load_shard(Checkpoint(tiny_llama.path), LayerRange(0, 4), pack=False)
    split = load_shard(Checkpoint(tmp_path), LayerRange(0, 4), pack=False)
    for (name, a), (_, b) in zip(
        whole.state_dict().items(), split.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_wrong_shape_fails_loudly(tiny_llama: TinyModel, tmp_path: Path) -> None:
    path = copy_model(tiny_llama, tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(7, 64)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"up_proj.weight: shape \(7, 64\)"):
        load_shard(Checkpoint(path), LayerRange(0, 2))


def test_missing_tensor_fails_loudly(tiny_llama: TinyModel, tmp_path: Path) -> None:
    path = copy_model(tiny_llama, tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.2.self_attn.k_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    load_shard(Checkpoint(path), LayerRange(0, 2))  # other ranges are unaffected
    with pytest.raises(CheckpointError, match="k_proj"):
        load_shard(Checkpoint(path), LayerRange(2, 4))


def test_unsupported_architecture(tiny_llama: TinyModel, tmp_path: Path) -> None:
    path = copy_model(tiny_llama, tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        Checkpoint(path)


def test_pickle_checkpoints_are_refused(tiny_llama: TinyModel, tmp_path: Path) -> None:
    path = copy_model(tiny_llama, tmp_path)
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickles"):
        Checkpoint(path)


def test_tinyllama_style_config_is_understood(tmp_path: Path) -> None:
    """The reference model's config.json as published (older transformers format)."""
    from teeshard.model.spec import ArchSpec

    config = {
        "architectures": ["LlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 5632,
        "max_position_embeddings": 2048,
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_hidden_layers": 22,
        "num_key_value_heads": 4,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.35.0",
        "use_cache": True,
        "vocab_size": 32000,
    }
    spec = ArchSpec.from_hf_config(config)
    assert (spec.num_layers, spec.head_dim, spec.num_kv_heads, spec.torch_dtype) == (
        22,
        64,
        4,
        "bfloat16",
    )
    assert spec.rope.theta == 10000.0 and spec.rope.rope_type == "default"
    assert ArchSpec.from_dict(spec.to_dict()) == spec


def _rss_mib() -> float:
    return float(psutil.Process().memory_info().rss) / 2**20


def test_freed_heap_memory_goes_back_to_the_system() -> None:
    """What loading leaves behind: blocks freed between blocks still held (the stored
    bytes of weights laid out anew) stay resident in glibc's heap until trimmed."""
    chunks = [torch.ones(16 * 1024) for _ in range(8192)]  # 64 KiB each: heap, not mmap
    kept = chunks[1::2]
    del chunks  # every other one freed: holes the heap cannot shrink past
    before = _rss_mib()
    if not release_freed_heap():
        pytest.skip("no malloc_trim here (not glibc)")
    assert before - _rss_mib() > 128  # about 256 MiB of holes
    assert all(bool((t == 1).all()) for t in kept[:16])  # what is held stays intact
