from __future__ import annotations

import pytest

from teeshard.model.checkpoint import Checkpoint
from teeshard.model.layer_range import LayerRange
from teeshard.model.plan import plan_checkpoint, split_even, split_weighted
from tests.checkpoints import TinyModel


def test_even_split_covers_every_layer_once() -> None:
    assert split_even(22, 2) == [LayerRange(0, 11), LayerRange(11, 22)]
    assert split_even(10, 3) == [LayerRange(0, 4), LayerRange(4, 7), LayerRange(7, 10)]
    assert split_even(4, 4) == [LayerRange(i, i + 1) for i in range(4)]


@pytest.mark.parametrize(("layers", "nodes"), [(4, 5), (4, 0)])
def test_impossible_splits_are_refused(layers: int, nodes: int) -> None:
    with pytest.raises(ValueError, match=r"split|at least one"):
        split_even(layers, nodes)


def test_weighted_split_follows_capacity() -> None:
    ranges = split_weighted([10] * 12, weights=[3, 1])
    assert ranges == [LayerRange(0, 9), LayerRange(9, 12)]


def test_weighted_split_counts_embedding_and_head() -> None:
    # a huge embedding on node 0 pushes layers to node 1 even with equal weights
    ranges = split_weighted([10] * 10, weights=[1, 1], first_extra=60)
    assert ranges == [LayerRange(0, 2), LayerRange(2, 10)]


def test_weighted_split_rejects_bad_weights() -> None:
    with pytest.raises(ValueError, match="positive"):
        split_weighted([1, 1], weights=[1, 0])


def test_plan_reports_each_nodes_bytes(tiny_llama: TinyModel) -> None:
    checkpoint = Checkpoint(tiny_llama.path)
    plans = plan_checkpoint(checkpoint, 2)
    total = sum(info.nbytes for info in checkpoint.tensors.values())
    assert sum(p.param_bytes for p in plans) == total  # nothing loaded twice, nothing missed
    assert plans[0].param_bytes == checkpoint.nbytes(checkpoint.keys_for(LayerRange(0, 2)))


def test_layer_range_parsing() -> None:
    assert LayerRange.parse("3:7") == LayerRange(3, 7)
    for bad in ("3", "a:b", "5:5", "-1:2"):
        with pytest.raises(ValueError):
            LayerRange.parse(bad)
