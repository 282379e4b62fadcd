"""Random-weight Hugging Face checkpoints for exactness tests and benchmarks.

Tests compare teeshard's split pipeline with transformers on tiny random models of
each architecture; benchmarks time TinyLlama-shaped ones. Their text is noise,
which is fine where only bit-exactness is measured. The built-in demo, a model
that was trained, is :mod:`teeshard.model.demo`. The tokenizer here is a
byte-level BPE trained on ``random_corpus.txt`` (the original random demo's
tokenizer text, kept byte for byte so the tests' token counts stay as they were)
with TinyLlama's (Zephyr-style) chat template, so these models speak the
reference model's format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

BOS, EOS = "<s>", "</s>"
# TinyLlama's (Zephyr-style) chat template, so these models speak the reference model's format,
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


def train_tokenizer(vocab_size: int = 1024) -> Any:
    """A byte-level BPE trained on the bundled corpus; deterministic for a given corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = (Path(__file__).parent / "random_corpus.txt").read_text().splitlines()
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
        "model_max_length": 2048,
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
