"""One pipeline stage: sessions, the pure step, the pipeline socket, the next hop.

``NodeService`` runs a shard's sessions and steps; ``attach_pipeline`` serves its
socket; ``NextHop`` is its link to the next node of the route. Errors (each with
a code and the HTTP status the entry node gives a client)::

    NodeError
    ├── BadRequestError      400  malformed frame, wrong shape or dtype, bad token ids
    │   └── CacheFullError   400  a step would pass the session's maximum length
    ├── UnknownSessionError  404  session id never opened, closed, or evicted
    ├── OverloadedError      503  admission control: session or token budget spent
    └── DownstreamError      502  the next node failed or is unreachable
"""

from teeshard.node.errors import (
    BadRequestError,
    CacheFullError,
    DownstreamError,
    NodeError,
    OverloadedError,
    UnknownSessionError,
)
from teeshard.node.hop import HopStep, NextHop
from teeshard.node.metrics import Metrics, stage_metrics
from teeshard.node.pipeline import PIPELINE_PATH, attach_pipeline
from teeshard.node.service import NodeService, StageCounters, StepResult
from teeshard.node.sessions import Session, SessionLimits, SessionStore

__all__ = [
    "PIPELINE_PATH",
    "BadRequestError",
    "CacheFullError",
    "DownstreamError",
    "HopStep",
    "Metrics",
    "NextHop",
    "NodeError",
    "NodeService",
    "OverloadedError",
    "Session",
    "SessionLimits",
    "SessionStore",
    "StageCounters",
    "StepResult",
    "UnknownSessionError",
    "attach_pipeline",
    "stage_metrics",
]
