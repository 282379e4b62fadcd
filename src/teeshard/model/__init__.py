"""The model: architecture spec, checkpoint, shard loader, transformer blocks, sampling.

Nothing here knows about networks or other nodes: a ``Shard`` is layers
``[start, end)`` of one checkpoint, loaded onto an empty skeleton, run against a
per-session ``KVCache``. Errors: ``CheckpointError`` (bad files),
``UnsupportedModelError`` (an architecture we do not implement),
``CacheFullError`` (a step past the session's maximum length).
"""

from teeshard.model.checkpoint import Checkpoint, CheckpointError
from teeshard.model.layer_range import LayerRange
from teeshard.model.loader import load_shard, parse_dtype
from teeshard.model.plan import ShardPlan, plan_checkpoint, split_even, split_weighted
from teeshard.model.sampling import SamplingParams, sample, session_seed
from teeshard.model.spec import ArchSpec, UnsupportedModelError
from teeshard.model.transformer import CacheFullError, KVCache, Shard

__all__ = [
    "ArchSpec",
    "CacheFullError",
    "Checkpoint",
    "CheckpointError",
    "KVCache",
    "LayerRange",
    "SamplingParams",
    "Shard",
    "ShardPlan",
    "UnsupportedModelError",
    "load_shard",
    "parse_dtype",
    "plan_checkpoint",
    "sample",
    "session_seed",
    "split_even",
    "split_weighted",
]
