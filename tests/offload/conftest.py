"""Accelerators as real separate processes on CPU, and helpers to run a shard greedily."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from teeshard.model.checkpoint import Checkpoint
from teeshard.model.layer_range import LayerRange
from teeshard.model.loader import load_shard
from teeshard.model.transformer import Shard
from teeshard.offload.client import AcceleratorClient
from teeshard.offload.launch import AcceleratorProcess, accel_command, start_accelerator

StartAccel = Callable[..., AcceleratorProcess]


@pytest.fixture(scope="module")
def start_accel() -> Iterator[StartAccel]:
    """Start ``teeshard accel`` (or a test module) processes; all stopped at module end."""
    started: list[AcceleratorProcess] = []
    shared: dict[tuple[object, ...], AcceleratorProcess] = {}

    def start(
        model_dir: Path,
        layers: LayerRange,
        arith: str = "field",
        module: str = "teeshard.cli",
        extra: tuple[str, ...] = (),
        device: str = "cpu",
        reuse: bool = True,
    ) -> AcceleratorProcess:
        """A process per distinct set of arguments; ``reuse=False`` always starts another."""
        key = (model_dir, layers, arith, module, extra, device)
        if reuse and key in shared and shared[key].process.poll() is None:
            return shared[key]
        command = accel_command(model_dir, layers, arith, device=device, threads=1, module=module)
        process = start_accelerator([*command, *extra], timeout=120)
        started.append(process)
        if reuse:
            shared[key] = process
        return process

    yield start
    for process in started:
        process.stop()


def connect(accel: AcceleratorProcess, **kwargs: object) -> AcceleratorClient:
    client = AcceleratorClient(accel.endpoint, accel.public_key, timeout_s=30, **kwargs)  # type: ignore[arg-type]
    client.connect()
    return client


def load(model_dir: Path, layers: LayerRange | None = None) -> Shard:
    checkpoint = Checkpoint(model_dir)
    # plain nn.Linear modules, as a node that offloads loads them (no oneDNN repacking)
    return load_shard(checkpoint, layers or LayerRange(0, checkpoint.spec.num_layers), pack=False)


PROMPT = [0, 17, 42, 99, 7, 311, 5, 64]


@torch.no_grad()
def greedy(shard: Shard, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the logits of each step, through the shard's own forward."""
    cache = shard.new_cache(len(prompt) + steps + 1)
    logits = shard(shard.embed(torch.tensor([prompt])), cache)
    tokens, seen = [], []
    for _ in range(steps):
        token = int(logits[0].argmax())
        tokens.append(token)
        seen.append(logits[0])
        logits = shard(shard.embed(torch.tensor([[token]])), cache)
    return tokens, torch.stack(seen)
