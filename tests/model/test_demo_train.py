"""scripts/train_demo.py's training: deterministic, and its output is a loadable checkpoint."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from teeshard.model.checkpoint import Checkpoint
from teeshard.model.demo_data import parse_dialogues, prose_sections
from teeshard.model.demo_train import (
    TrainSettings,
    learning_rate,
    train,
    weights_digest,
    write_demo,
)
from teeshard.model.formats import NumberFormat
from teeshard.model.layer_range import LayerRange
from teeshard.model.loader import load_shard

# The shipped architecture's shape of training at a fraction of its size and steps.
QUICK = dataclasses.replace(
    TrainSettings(),
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    seq_len=32,
    batch_size=4,
    steps=4,
    threads=1,
)


def test_training_twice_gives_the_same_losses_and_weights() -> None:
    first, second = train(QUICK), train(QUICK)
    assert first.losses == second.losses
    assert weights_digest(first.model) == weights_digest(second.model)
    other = train(dataclasses.replace(QUICK, seed=QUICK.seed + 1))
    assert weights_digest(other.model) != weights_digest(first.model)


def test_written_checkpoint_loads_in_teeshard_and_transformers_alike(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    result = train(QUICK)
    write_demo(result, QUICK, tmp_path)
    record = json.loads((tmp_path / "training.json").read_text())
    assert record["settings"]["steps"] == 4 and len(record["weights_sha256_float32"]) == 64
    checkpoint = Checkpoint(tmp_path)
    assert checkpoint.spec.tie_word_embeddings and checkpoint.spec.num_layers == 2
    shard = load_shard(checkpoint, LayerRange(0, 2), NumberFormat().torch_dtype)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 300, 2]])
    with torch.no_grad():
        expected = hf(ids).logits[0]
    assert shard.spec.vocab_size == expected.shape[-1]
    # the float16 weights on disk, widened, are what both computed with
    embed = hf.model.embed_tokens.weight
    assert torch.equal(embed, result.model.model.embed_tokens.weight.half().float())


def test_learning_rate_warms_up_then_decays_to_a_tenth() -> None:
    settings = TrainSettings()
    assert learning_rate(settings, 0) == pytest.approx(settings.lr / settings.warmup_steps)
    assert learning_rate(settings, settings.warmup_steps) == pytest.approx(settings.lr)
    assert learning_rate(settings, settings.steps) == pytest.approx(settings.lr / 10)


def test_dialogue_blocks_parse_and_bad_ones_are_refused() -> None:
    blocks = parse_dialogues("# c\n\nQ: a?\nQ: b?\nA: yes.\n\nQ: c?\nA: no.\n")
    assert [(b.questions, b.answer) for b in blocks] == [(("a?", "b?"), "yes."), (("c?",), "no.")]
    with pytest.raises(ValueError, match="block 1"):
        parse_dialogues("Q: a?\nA: one\nA: two\n")
    assert prose_sections("# One\nfirst\n\n# Two\nsecond\n") == ["One\nfirst", "Two\nsecond"]
