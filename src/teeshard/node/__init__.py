"""One pipeline stage: sessions, the pure step, the pipeline socket, the next hop.

``NodeService`` runs a shard's sessions and steps; ``attach_pipeline`` serves its
socket; ``NextHop`` is its link to the next node of the route. Every error is a
``NodeError`` with a code and the HTTP status the entry node gives a client (the
tree is drawn in ``teeshard.node.errors``).
"""

from teeshard.node.errors import (
    AcceleratorFailedError,
    BadRequestError,
    CacheFullError,
    DownstreamError,
    NodeError,
    OverloadedError,
    UnknownSessionError,
)
from teeshard.node.hop import HopStep, NextHop
from teeshard.node.metrics import Metrics, stage_metrics
from teeshard.node.pipeline import (
    PIPELINE_PATH,
    PipelineLimits,
    Upstream,
    UpstreamVerifier,
    attach_pipeline,
)
from teeshard.node.scheduler import SchedulerLimits, StepScheduler
from teeshard.node.service import (
    NodeService,
    Owner,
    Session,
    SessionLimits,
    SessionStore,
    StageCounters,
    StepResult,
)

__all__ = [
    "PIPELINE_PATH",
    "AcceleratorFailedError",
    "BadRequestError",
    "CacheFullError",
    "DownstreamError",
    "HopStep",
    "Metrics",
    "NextHop",
    "NodeError",
    "NodeService",
    "OverloadedError",
    "Owner",
    "PipelineLimits",
    "SchedulerLimits",
    "Session",
    "SessionLimits",
    "SessionStore",
    "StageCounters",
    "StepResult",
    "StepScheduler",
    "UnknownSessionError",
    "Upstream",
    "UpstreamVerifier",
    "attach_pipeline",
    "stage_metrics",
]
