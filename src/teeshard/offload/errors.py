"""Errors of the offload package.

::

    OffloadError
    ├── OffloadConfigError        bad mode, key, layer range or accelerator layout (400-like)
    ├── AcceleratorError          the accelerator could not be used for a step
    │   ├── AcceleratorUnavailable    no answer, handshake refused, socket closed (transport)
    │   └── AcceleratorMisbehaved     a reply failed its check: wrong product, stale, malformed
    ├── PadReuseError             a one-time pad was opened a second time (a bug, never retried)
    └── OffloadPolicyError        a verifier's policy refuses the node's offload mode

An accelerator that misbehaves once is never used again by that node
(:class:`AcceleratorMisbehaved` is sticky); an unavailable one may be retried.
"""

from __future__ import annotations


class OffloadError(Exception):
    """Base of every offload error."""


class OffloadConfigError(OffloadError, ValueError):
    """The offload set-up is invalid: unknown mode, bad key, layers the accelerator lacks."""


class AcceleratorError(OffloadError):
    """A product could not be obtained from the accelerator."""


class AcceleratorUnavailable(AcceleratorError):
    """Transport failure: timeout, refused CURVE handshake, closed socket."""


class AcceleratorMisbehaved(AcceleratorError):
    """The accelerator returned something that failed verification; it is now distrusted."""


class PadReuseError(OffloadError):
    """A one-time pad was opened twice: refused, since reuse would reveal activations."""


class OffloadPolicyError(OffloadError):
    """A policy does not accept the offload mode (or accelerator) a node attests."""
