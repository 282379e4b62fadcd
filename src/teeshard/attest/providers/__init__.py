"""Attestation providers: dstack, Gramine, configfs-tsm and the (insecure) simulated one."""

from teeshard.attest.providers.base import Provider
from teeshard.attest.providers.detect import TEE_CHOICES, ProviderRoots, select_provider
from teeshard.attest.providers.dstack import DstackProvider
from teeshard.attest.providers.gramine import GramineProvider
from teeshard.attest.providers.simulated import SimulatedProvider
from teeshard.attest.providers.tsm import TsmProvider

__all__ = [
    "TEE_CHOICES",
    "DstackProvider",
    "GramineProvider",
    "Provider",
    "ProviderRoots",
    "SimulatedProvider",
    "TsmProvider",
    "select_provider",
]
