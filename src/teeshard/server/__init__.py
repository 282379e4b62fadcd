"""The node process: configuration, trust set-up, the app, and running it.

``build_node(NodeConfig(...))`` loads and hashes a shard, attests it, wires the
next hop and the entry API, and returns a ``Node`` whose ``app`` is ready to
serve; ``serve(config)`` does that and runs uvicorn. ``local_pipeline`` writes
the policy of a whole route on one host (``teeshard up``, tests, benchmarks).
"""

from teeshard.server.app import create_app, health_report
from teeshard.server.config import NodeConfig
from teeshard.server.local_pipeline import local_policy_toml, write_local_policy
from teeshard.server.runtime import Node, build_node, frame_limit, make_server, serve
from teeshard.server.trust import NodeTrust, trust_for

__all__ = [
    "Node",
    "NodeConfig",
    "NodeTrust",
    "build_node",
    "create_app",
    "frame_limit",
    "health_report",
    "local_policy_toml",
    "make_server",
    "serve",
    "trust_for",
    "write_local_policy",
]
