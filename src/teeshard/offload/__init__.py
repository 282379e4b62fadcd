"""TSQP mode: a TEE node's linear layers on an untrusted accelerator, blinded and verified.

The public surface: :func:`offload_shard` (the transformation of a loaded shard),
:func:`connect_offload` (pinned clients, then the transformation), the
accelerator (:class:`Accelerator`, :func:`serve`), the modes and the policy
check (:func:`check_node_offload`), and the error tree of :mod:`.errors`.
"""

from teeshard.offload.apply import OffloadHandle, OffloadOptions, offload_shard
from teeshard.offload.client import AcceleratorClient
from teeshard.offload.errors import (
    AcceleratorError,
    AcceleratorMisbehaved,
    AcceleratorUnavailable,
    OffloadConfigError,
    OffloadError,
    OffloadPolicyError,
    PadReuseError,
)
from teeshard.offload.keys import KeyPair, fingerprint, parse_public_key
from teeshard.offload.modes import (
    POLICY_VALUES,
    OffloadAttestation,
    OffloadMode,
    check_node_offload,
    check_offload_policy,
)
from teeshard.offload.setup import connect_offload

__all__ = [
    "POLICY_VALUES",
    "AcceleratorClient",
    "AcceleratorError",
    "AcceleratorMisbehaved",
    "AcceleratorUnavailable",
    "KeyPair",
    "OffloadAttestation",
    "OffloadConfigError",
    "OffloadError",
    "OffloadHandle",
    "OffloadMode",
    "OffloadOptions",
    "OffloadPolicyError",
    "PadReuseError",
    "check_node_offload",
    "check_offload_policy",
    "connect_offload",
    "fingerprint",
    "offload_shard",
    "parse_public_key",
]
