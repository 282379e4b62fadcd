"""Choose the attestation provider: auto-detect, or the one named by ``--tee``.

Auto-detection order: dstack (guest agent, then legacy tappd socket), configfs-tsm,
Gramine; the simulated provider only when explicitly allowed. The choice is logged
once at start-up, and a simulated choice is logged as a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from teeshard.attest.errors import ProviderUnavailable
from teeshard.attest.providers import gramine, tsm
from teeshard.attest.providers.base import Provider
from teeshard.attest.providers.dstack import DstackProvider
from teeshard.attest.providers.gramine import GramineProvider
from teeshard.attest.providers.simulated import SimulatedProvider
from teeshard.attest.providers.tsm import TsmProvider

log = logging.getLogger(__name__)

TEE_CHOICES = ("auto", "dstack", "tsm", "gramine", "simulated")


@dataclass(frozen=True)
class ProviderRoots:
    """Where to look for each TEE interface; tests point these at fake directories."""

    dstack_root: Path = Path("/")
    tsm_root: Path = tsm.DEFAULT_ROOT
    gramine_root: Path = gramine.DEFAULT_ROOT


def select_provider(
    tee: str = "auto",
    *,
    allow_simulated: bool = False,
    data_dir: str | Path | None = None,
    roots: ProviderRoots = ProviderRoots(),
) -> Provider:
    """The provider for ``tee`` (one of TEE_CHOICES); raises ProviderUnavailable if absent.

    ``data_dir`` persists the simulated provider's key; without it the key is ephemeral.
    Forcing ``tee="simulated"`` counts as allowing it.
    """
    if tee not in TEE_CHOICES:
        raise ProviderUnavailable(f"unknown TEE {tee!r}; choose one of {', '.join(TEE_CHOICES)}")
    provider = _select(tee, allow_simulated, data_dir, roots)
    if provider.name == "simulated":
        log.warning("attestation provider: simulated (INSECURE, no TEE: for development only)")
    else:
        log.info("attestation provider: %s", provider.name)
    return provider


def _select(
    tee: str, allow_simulated: bool, data_dir: str | Path | None, roots: ProviderRoots
) -> Provider:
    if tee == "simulated":
        return _simulated(data_dir)
    if tee == "dstack":
        found = DstackProvider.detect(roots.dstack_root)
        if found is None:
            raise ProviderUnavailable("dstack: neither dstack.sock nor tappd.sock is mounted")
        return found
    if tee == "tsm":
        return TsmProvider(roots.tsm_root)
    if tee == "gramine":
        return GramineProvider(roots.gramine_root)
    detected: Provider | None = DstackProvider.detect(roots.dstack_root)
    if detected is None:
        detected = TsmProvider.detect(roots.tsm_root)
    if detected is None:
        detected = GramineProvider.detect(roots.gramine_root)
    if detected is not None:
        return detected
    if allow_simulated:
        return _simulated(data_dir)
    raise ProviderUnavailable(
        "no TEE found (no dstack/tappd socket, no configfs-tsm, no /dev/attestation); "
        "use --tee simulated (or --allow-simulated) for insecure development mode"
    )


def _simulated(data_dir: str | Path | None) -> SimulatedProvider:
    if data_dir is None:
        return SimulatedProvider()
    return SimulatedProvider.from_data_dir(data_dir)
