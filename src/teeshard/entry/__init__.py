"""The entry node's user-facing API on top of a stage: OpenAI-compatible HTTP and SSE.

``OpenAIServing`` turns requests into generations; ``GenerationLoop`` runs
prefill and decode through the stage (``teeshard.node``) and charges through
``Billing``; ``attach_router`` and ``attach_sealed_router`` serve it. Every
error leaves as ``APIError`` in the OpenAI error shape, with the status that
fits (node errors keep theirs; ledger errors map through ``api_error_for``).
"""

from teeshard.entry.admission import AdmissionQueue, QueueLimits
from teeshard.entry.billing import Billing, BillingAPI, api_error_for
from teeshard.entry.console_api import attach_console
from teeshard.entry.errors import APIError
from teeshard.entry.failover import FailoverPolicy, ReceiptSegment
from teeshard.entry.generation import Generation, GenerationLoop, GenerationParams
from teeshard.entry.network_routes import attach_network_routes
from teeshard.entry.registry import NetworkFileError, Registry, load_network
from teeshard.entry.routes import attach_router, install_error_handlers
from teeshard.entry.routing import NodeView, NoRouteError, choose_route
from teeshard.entry.sealed import attach_sealed_router
from teeshard.entry.serving import Caller, OpenAIServing
from teeshard.entry.text import TextCodec

__all__ = [
    "APIError",
    "AdmissionQueue",
    "Billing",
    "BillingAPI",
    "Caller",
    "FailoverPolicy",
    "Generation",
    "GenerationLoop",
    "GenerationParams",
    "NetworkFileError",
    "NoRouteError",
    "NodeView",
    "OpenAIServing",
    "QueueLimits",
    "ReceiptSegment",
    "Registry",
    "TextCodec",
    "api_error_for",
    "attach_console",
    "attach_network_routes",
    "attach_router",
    "attach_sealed_router",
    "choose_route",
    "install_error_handlers",
    "load_network",
]
