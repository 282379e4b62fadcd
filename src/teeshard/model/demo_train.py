"""Train the demo model: a small Llama (GQA, tied embeddings) on the demo corpus, on CPU.

Deterministic: the tokenizer is a pure function of the corpus; the weights of
(corpus, :class:`TrainSettings`, torch version, CPU kind), with a fixed seed, a
fixed thread count, deterministic algorithms and a data order drawn from the
seed. ``scripts/train_demo.py`` is the command line; the result is written as a
plain Hugging Face checkpoint (float16 safetensors) with ``training.json``
recording the settings, the loss curve and the digests.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from teeshard.model.demo import DEMO_NAME, EOS, PAD, corpus_files
from teeshard.model.demo_data import train_tokenizer, training_documents, write_tokenizer


@dataclass(frozen=True)
class TrainSettings:
    seed: int = 20261201
    vocab_size: int = 2048  # byte-level BPE: ~4 characters a token on this corpus
    hidden_size: int = 256
    intermediate_size: int = 640
    num_layers: int = 6  # splits over 2, 3 or 4 nodes
    num_heads: int = 8  # head_dim 32
    num_kv_heads: int = 2  # GQA: 4 query heads share each key/value head
    max_positions: int = 1024
    seq_len: int = 256  # training window; documents are packed, separated by <|endoftext|>
    batch_size: int = 8
    steps: int = 400
    lr: float = 3e-3  # AdamW peak; linear warm-up, cosine decay to lr / 10
    warmup_steps: int = 20
    weight_decay: float = 0.05
    threads: int = 2


@dataclass(frozen=True)
class TrainResult:
    model: Any  # transformers.LlamaForCausalLM, float32, eval mode
    tokenizer: Any  # tokenizers.Tokenizer
    losses: list[float]
    tokens: int  # tokens in one epoch of the corpus
    seconds: float


def llama_config(settings: TrainSettings, tokenizer: Any) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": settings.vocab_size,
        "hidden_size": settings.hidden_size,
        "intermediate_size": settings.intermediate_size,
        "num_hidden_layers": settings.num_layers,
        "num_attention_heads": settings.num_heads,
        "num_key_value_heads": settings.num_kv_heads,
        "head_dim": settings.hidden_size // settings.num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": settings.max_positions,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "torch_dtype": "float16",
        "bos_token_id": tokenizer.token_to_id(PAD),
        "eos_token_id": tokenizer.token_to_id(EOS),
        "pad_token_id": tokenizer.token_to_id(PAD),
    }


def epoch_windows(
    encoded: list[list[int]], separator: int, seq_len: int, generator: torch.Generator
) -> torch.Tensor:
    """One epoch: documents in a seeded order, packed, cut into windows of seq_len + 1."""
    order = torch.randperm(len(encoded), generator=generator).tolist()
    stream = [token for index in order for token in [*encoded[index], separator]]
    count = len(stream) // (seq_len + 1)
    return torch.tensor(stream[: count * (seq_len + 1)]).view(count, seq_len + 1)


def batches(
    encoded: list[list[int]], separator: int, settings: TrainSettings, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    while True:
        windows = epoch_windows(encoded, separator, settings.seq_len, generator)
        for start in range(0, len(windows) - settings.batch_size + 1, settings.batch_size):
            yield windows[start : start + settings.batch_size]  # (B, T + 1)


def learning_rate(settings: TrainSettings, step: int) -> float:
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    settings: TrainSettings,
    corpus_root: Path | None = None,
    progress: Callable[[int, float, float], None] | None = None,
) -> TrainResult:
    """Train from scratch; ``progress(step, loss, seconds)`` after every step."""
    import transformers

    torch.set_num_threads(settings.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(settings.seed)
    documents = training_documents(settings.seed, corpus_root)
    tokenizer = train_tokenizer(documents, settings.vocab_size)
    encoded = [e.ids for e in tokenizer.encode_batch(documents)]
    config = transformers.LlamaConfig(**llama_config(settings, tokenizer))
    model = transformers.LlamaForCausalLM(config)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": other},
    ]
    optimizer = torch.optim.AdamW(
        groups,
        lr=settings.lr,
        betas=(0.9, 0.95),
        weight_decay=0.0,
        foreach=False,
    )
    data = batches(
        encoded, tokenizer.token_to_id(PAD), settings, torch.Generator().manual_seed(settings.seed)
    )
    losses: list[float] = []
    started = time.monotonic()
    model.train()
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(settings, step)
        window = next(data)
        logits = model(input_ids=window[:, :-1]).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if progress:
            progress(step, losses[-1], time.monotonic() - started)
    tokens = sum(len(e) + 1 for e in encoded)
    return TrainResult(model.eval(), tokenizer, losses, tokens, time.monotonic() - started)


def weights_digest(model: Any) -> str:
    """sha256 over every parameter's float32 bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def corpus_digest(root: Path | None = None) -> str:
    digest = hashlib.sha256()
    for path in corpus_files() if root is None else sorted(root.glob("*.txt")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def write_demo(result: TrainResult, settings: TrainSettings, out: Path) -> None:
    """A Hugging Face checkpoint directory: config, float16 safetensors, tokenizer, record."""
    out.mkdir(parents=True, exist_ok=True)
    config = llama_config(settings, result.tokenizer)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {
        name: tensor.detach().to(torch.float16).contiguous()
        for name, tensor in sorted(result.model.state_dict().items())
        if name != "lm_head.weight"  # tied to model.embed_tokens.weight
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    generation = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_tokenizer(result.tokenizer, out, settings.max_positions)
    record = {
        "name": DEMO_NAME,
        "settings": asdict(settings),
        "parameters": sum(t.numel() for t in tensors.values()),
        "corpus_sha256": corpus_digest(),
        "corpus_tokens_per_epoch": result.tokens,
        "epochs": round(settings.steps * settings.batch_size * settings.seq_len / result.tokens, 2),
        "final_loss_mean_last_20": round(sum(result.losses[-20:]) / 20, 4),
        "losses_every_10": [round(x, 4) for x in result.losses[::10]],
        "train_seconds": round(result.seconds, 1),
        "torch": torch.__version__,
        "weights_sha256_float32": weights_digest(result.model),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
