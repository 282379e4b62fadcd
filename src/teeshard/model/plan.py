"""Split planning: which node serves which half-open layer range. Pure; no I/O."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from teeshard.model.checkpoint import Checkpoint
from teeshard.model.formats import NumberFormat
from teeshard.model.layer_range import LayerRange
from teeshard.model.loader import shard_param_name


@dataclass(frozen=True)
class ShardPlan:
    layers: LayerRange
    param_bytes: int  # weights this node loads (embedding/head included where it holds them)


def split_even(num_layers: int, num_nodes: int) -> list[LayerRange]:
    """Equal layer counts; the first ``num_layers % num_nodes`` nodes take one more."""
    _check_counts(num_layers, num_nodes)
    base, extra = divmod(num_layers, num_nodes)
    ranges, start = [], 0
    for index in range(num_nodes):
        end = start + base + (1 if index < extra else 0)
        ranges.append(LayerRange(start, end))
        start = end
    return ranges


def split_weighted(
    layer_bytes: Sequence[int], weights: Sequence[float], first_extra: int = 0, last_extra: int = 0
) -> list[LayerRange]:
    """Contiguous ranges whose bytes are proportional to ``weights`` (e.g. memory per node).

    Minimises the largest ``bytes / weight`` over nodes (dynamic programming over
    split points), counting the embedding on the first node and the head on the last.
    """
    num_layers, num_nodes = len(layer_bytes), len(weights)
    _check_counts(num_layers, num_nodes)
    if any(w <= 0 for w in weights):
        raise ValueError("node weights must be positive")
    prefix = [0]
    for size in layer_bytes:
        prefix.append(prefix[-1] + size)

    def load(node: int, start: int, end: int) -> float:
        total = prefix[end] - prefix[start]
        total += first_extra if node == 0 else 0
        total += last_extra if node == num_nodes - 1 else 0
        return total / weights[node]

    inf = float("inf")
    # best[n][e]: smallest max-load placing layers [0, e) on nodes [0, n)
    best = [[inf] * (num_layers + 1) for _ in range(num_nodes + 1)]
    choice = [[0] * (num_layers + 1) for _ in range(num_nodes + 1)]
    best[0][0] = 0.0
    for node in range(1, num_nodes + 1):
        for end in range(node, num_layers + 1):
            for start in range(node - 1, end):
                candidate = max(best[node - 1][start], load(node - 1, start, end))
                if candidate < best[node][end]:
                    best[node][end], choice[node][end] = candidate, start
    ranges, end = [], num_layers
    for node in range(num_nodes, 0, -1):
        start = choice[node][end]
        ranges.append(LayerRange(start, end))
        end = start
    return ranges[::-1]


def plan_checkpoint(
    checkpoint: Checkpoint, num_nodes: int, weights: Sequence[float] | None = None
) -> list[ShardPlan]:
    spec = checkpoint.spec
    if weights is None:
        ranges = split_even(spec.num_layers, num_nodes)
    else:
        if len(weights) != num_nodes:
            raise ValueError(f"{len(weights)} weights given for {num_nodes} nodes")
        first = checkpoint.nbytes(["model.embed_tokens.weight"])
        last = checkpoint.nbytes({"model.norm.weight", checkpoint.lm_head_key()})
        layer_bytes = [checkpoint.layer_nbytes(i) for i in range(spec.num_layers)]
        ranges = split_weighted(layer_bytes, weights, first, last)
    return [ShardPlan(r, checkpoint.nbytes(checkpoint.keys_for(r))) for r in ranges]


def format_bytes(checkpoint: Checkpoint, layers: LayerRange, fmt: NumberFormat) -> int:
    """Weight bytes a node serving ``layers`` holds in number format ``fmt`` (KV cache apart)."""
    is_last = layers.is_last(checkpoint.spec.num_layers)
    lm_head_key = checkpoint.lm_head_key()
    total = 0
    for key in checkpoint.keys_for(layers):
        shape = checkpoint.tensors[key].shape
        for name in shard_param_name(key, layers, lm_head_key, is_last):
            total += fmt.param_bytes(name, shape)
    return total


def kv_bytes_per_token(checkpoint: Checkpoint, layers: LayerRange, fmt: NumberFormat) -> int:
    """KV cache bytes one cached position costs on that node (keys and values, every layer)."""
    spec = checkpoint.spec
    item = 4 if fmt.dtype == "float32" else 2
    return 2 * len(layers) * spec.kv_dim * item


def _check_counts(num_layers: int, num_nodes: int) -> None:
    if num_nodes < 1:
        raise ValueError("need at least one node")
    if num_nodes > num_layers:
        raise ValueError(f"cannot split {num_layers} layers over {num_nodes} nodes")
