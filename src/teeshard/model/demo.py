"""The built-in demo checkpoint: a small Llama with deterministic random weights.

It is a real Hugging Face checkpoint directory (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json with a chat template), built locally
because nothing can be downloaded at run time. The weights are random: its
text is meaningless. Same version, same bytes, on every machine.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from teeshard.paths import data_dir

DEMO_VERSION = 2
DEMO_NAME = "teeshard-demo-llama"
SEED = 20261122
BOS, EOS = "<s>", "</s>"
# TinyLlama's (Zephyr-style) chat template, so the demo speaks the reference model's format,
# with tools (version 2): the tools listed in a system turn, calls written in the Hermes
# format (``<tool_call>{"name": ..., "arguments": ...}</tool_call>``, what
# ``teeshard.entry.tools`` parses) and tool results in a ``<|tool|>`` turn.
CHAT_TEMPLATE = (
    "{% if tools %}{{ '<|system|>\\nTools:\\n' }}"
    "{% for tool in tools %}{{ (tool.function if tool.function is defined else tool) | tojson }}"
    "{{ '\\n' }}{% endfor %}"
    '{{ \'Call one as <tool_call>{"name": ..., "arguments": {...}}</tool_call>\' }}'
    "{{ eos_token + '\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% elif message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + (message['content'] or '') }}"
    "{% for call in message.get('tool_calls') or [] %}"
    "{% set f = call.function if call.function is defined else call %}"
    '{{ \'<tool_call>{"name": "\' + f.name + \'", "arguments": \' }}'
    "{% if f.arguments is string %}{{ f.arguments }}{% else %}{{ f.arguments | tojson }}{% endif %}"
    "{{ '}</tool_call>' }}{% endfor %}{{ eos_token + '\\n' }}"
    "{% elif message['role'] == 'tool' %}{{ '<|tool|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

DEMO_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "bos_token_id": 0,
    "eos_token_id": 1,
}


def demo_dir() -> Path:
    return data_dir() / f"{DEMO_NAME}-v{DEMO_VERSION}"


def train_tokenizer(vocab_size: int = 1024) -> Any:
    """A byte-level BPE trained on the bundled corpus; deterministic for a given corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = resources.files("teeshard.model").joinpath("demo_corpus.txt").read_text().splitlines()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def write_tokenizer(tokenizer: Any, out: Path, chat_template: str = CHAT_TEMPLATE) -> None:
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "model_max_length": DEMO_CONFIG["max_position_embeddings"],
        "add_bos_token": True,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}))


def random_llama_weights(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Every tensor of a Llama checkpoint, drawn from ``seed`` in a fixed order."""
    generator = torch.Generator().manual_seed(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_dim = config["num_attention_heads"] * head_dim
    kv_dim = config["num_key_value_heads"] * head_dim
    vocab = config["vocab_size"]

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.02

    tensors = {"model.embed_tokens.weight": normal(vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        tensors[prefix + "self_attn.q_proj.weight"] = normal(q_dim, hidden)
        tensors[prefix + "self_attn.k_proj.weight"] = normal(kv_dim, hidden)
        tensors[prefix + "self_attn.v_proj.weight"] = normal(kv_dim, hidden)
        tensors[prefix + "self_attn.o_proj.weight"] = normal(hidden, q_dim)
        tensors[prefix + "mlp.gate_proj.weight"] = normal(inter, hidden)
        tensors[prefix + "mlp.up_proj.weight"] = normal(inter, hidden)
        tensors[prefix + "mlp.down_proj.weight"] = normal(hidden, inter)
        tensors[prefix + "input_layernorm.weight"] = torch.ones(hidden)
        tensors[prefix + "post_attention_layernorm.weight"] = torch.ones(hidden)
    tensors["model.norm.weight"] = torch.ones(hidden)
    tensors["lm_head.weight"] = normal(vocab, hidden)
    return tensors


def write_checkpoint(
    out: Path,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    shard_bytes: int | None = None,
) -> None:
    """Write config.json and safetensors, split into files of ``shard_bytes`` with an index."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if shard_bytes is None:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    files: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if files[-1] and size + nbytes > shard_bytes:
            files.append({})
            size = 0
        files[-1][key] = tensor
        size += nbytes
    weight_map = {}
    for index, group in enumerate(files, start=1):
        name = f"model-{index:05d}-of-{len(files):05d}.safetensors"
        save_file(group, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, name))
    index_doc = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
        "weight_map": weight_map,
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2))


def ensure_demo(progress: Callable[[str], None] | None = None) -> Path:
    """Build the demo checkpoint once; later calls return the cached directory."""
    target = demo_dir()
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temporary directory and rename: a crash never leaves half a model.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        work = Path(tmp) / "model"
        work.mkdir()
        if progress:
            progress("training the demo tokenizer")
        tokenizer = train_tokenizer()
        write_tokenizer(tokenizer, work)
        config = {**DEMO_CONFIG, "vocab_size": tokenizer.get_vocab_size()}
        if progress:
            progress("drawing random weights")
        write_checkpoint(work, config, random_llama_weights(config, SEED))
        if target.exists():
            shutil.rmtree(target)
        work.rename(target)
    return target
