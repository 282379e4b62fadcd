"""The offload modes, what each reveals to the accelerator's operator, and policy checks.

=================  =================================================  ======================
mode               the accelerator's operator sees                    rests on
=================  =================================================  ======================
plain              every activation and, through the embedding,       nothing: comparison
                   the token ids; it can change any result unseen     only, flagged INSECURE
blinded            field elements x + r, r a fresh one-time pad:      the TEE; a CSPRNG
                   uniform, independent of x; it can still corrupt
                   results undetected
verified           quantized activations (as plain, without token     the TEE; Freivalds'
                   ids); any wrong product is caught (<= 2^-60)       secret vectors
blinded+verified   only uniform field elements; any wrong product     both of the above
                   is caught
two-server         A sees x + r, B sees r; both uniform on their own  A and B do not collude
(blinded, 2 accel)
=================  =================================================  ======================

The embedding stays in the TEE in every mode but plain, and attention, the KV
cache, norms, SiLU and sampling stay there always.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from teeshard.attest.verify.policy import OFFLOAD_REQUIREMENTS
from teeshard.offload.errors import OffloadConfigError, OffloadPolicyError


class OffloadMode(StrEnum):
    PLAIN = "plain"
    BLINDED = "blinded"
    VERIFIED = "verified"
    BLINDED_VERIFIED = "blinded+verified"

    @property
    def blinded(self) -> bool:
        return self in (OffloadMode.BLINDED, OffloadMode.BLINDED_VERIFIED)

    @property
    def verified(self) -> bool:
        return self in (OffloadMode.VERIFIED, OffloadMode.BLINDED_VERIFIED)

    @property
    def insecure(self) -> bool:
        return self is OffloadMode.PLAIN

    @property
    def arith(self) -> str:
        return "float" if self is OffloadMode.PLAIN else "field"

    @classmethod
    def parse(cls, text: str) -> OffloadMode:
        try:
            return cls(text)
        except ValueError:
            names = ", ".join(m.value for m in cls)
            raise OffloadConfigError(f"offload mode {text!r} is not one of {names}") from None


PAD_SOURCES = ("tee-precomputed", "two-server")


@dataclass(frozen=True)
class OffloadAttestation:
    """What a node states about its offload; goes into its manifest, so it is quoted."""

    mode: OffloadMode
    accelerator_keys: tuple[str, ...]  # SHA-256 fingerprints of the pinned CURVE keys
    pads: str | None = None  # blinded modes: "tee-precomputed" or "two-server"

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode.value,
            "accelerator_keys": list(self.accelerator_keys),
            "pads": self.pads,
            "insecure": self.mode.insecure,
        }

    @classmethod
    def from_json(cls, data: object) -> OffloadAttestation:
        if not isinstance(data, dict) or set(data) != {
            "mode",
            "accelerator_keys",
            "pads",
            "insecure",
        }:
            raise OffloadPolicyError(
                "offload statement: expected mode, accelerator_keys, pads, insecure"
            )
        keys = data["accelerator_keys"]
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise OffloadPolicyError(
                "offload statement: accelerator_keys must be a list of strings"
            )
        pads = data["pads"]
        if pads is not None and pads not in PAD_SOURCES:
            raise OffloadPolicyError(f"offload statement: unknown pad source {pads!r}")
        mode = OffloadMode.parse(str(data["mode"]))
        if data["insecure"] is not mode.insecure:
            raise OffloadPolicyError("offload statement: 'insecure' contradicts the mode")
        return cls(mode, tuple(keys), pads)

    def describe(self) -> str:
        keys = ", ".join(k[:16] for k in self.accelerator_keys)
        pads = f", pads {self.pads}" if self.pads else ""
        flag = " (INSECURE: activations in the clear)" if self.mode.insecure else ""
        return f"offload {self.mode.value}{flag}{pads}, accelerator key {keys}"


# Policy values, weakest to strongest demand; "forbid" allows TEE-only nodes only.
POLICY_VALUES = OFFLOAD_REQUIREMENTS  # the policy file's words, defined with the policy


def check_offload_policy(
    required: str,
    statement: OffloadAttestation | None,
    allowed_keys: tuple[str, ...] = (),
) -> None:
    """Raise :class:`OffloadPolicyError` unless ``statement`` meets ``required``.

    A node that does not offload (``statement is None``) meets every requirement.
    ``allowed_keys``, when given, lists the accelerator fingerprints accepted.
    """
    if required not in POLICY_VALUES:
        raise OffloadConfigError(
            f"policy offload = {required!r}: not one of {', '.join(POLICY_VALUES)}"
        )
    if statement is None:
        return
    mode = statement.mode
    ok = {
        "any": True,
        "protected": not mode.insecure,
        "blinded": mode.blinded,
        "verified": mode.verified,
        "blinded+verified": mode.blinded and mode.verified,
        "forbid": False,
    }[required]
    if not ok:
        raise OffloadPolicyError(f"policy requires offload = {required}; node uses {mode.value}")
    unknown = [k for k in statement.accelerator_keys if allowed_keys and k not in allowed_keys]
    if unknown:
        raise OffloadPolicyError(f"accelerator key {unknown[0][:16]} is not allowed by the policy")


def check_node_offload(
    required: str, manifest_offload: Mapping[str, Any] | None, allowed_keys: tuple[str, ...] = ()
) -> OffloadAttestation | None:
    """The policy check on a verified manifest's ``offload`` field (None: no offload).

    For the verifier: call it after the bundle verified, with ``manifest.offload``.
    """
    statement = (
        None if manifest_offload is None else OffloadAttestation.from_json(dict(manifest_offload))
    )
    check_offload_policy(required, statement, allowed_keys)
    return statement
