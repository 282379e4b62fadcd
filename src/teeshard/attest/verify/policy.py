"""Verification policy: which measurements, TCB statuses and shard manifests to accept.

A policy is a TOML or JSON file (by extension; ``.json`` is JSON, anything else TOML)::

    allowed_tcb_statuses = ["UpToDate"]       # default ["UpToDate"]
    allowed_advisory_ids = []                 # every advisory the quote names must be here
    allow_debug = false                       # debug TDs/enclaves: host can read memory
    allow_simulated = false                   # accept INSECURE simulated evidence
    simulated_keys = []                       # only these simulated keys (hex); flagged if empty
    max_evidence_age_s = 300                  # nonce signature must be younger than this

    [tdx]                                     # every value listed must match exactly
    mrtd = ["<96 hex>"]
    rtmr0 = ["<96 hex>"]
    rtmr1 = ["<96 hex>"]
    rtmr2 = ["<96 hex>"]
    rtmr3 = []                                # exact RTMR3 values (a TD without dstack)
    allow_any_rtmr3 = false                   # explicit: the app in the TD is not checked
    mrconfigid = []                           # where given, MRCONFIGID must be listed
    xfam = []                                 # where given, XFAM must be listed (16 hex)
    td_attributes_mask = "<16 hex>"           # where given: TDATTRIBUTES & mask == value
    td_attributes = "<16 hex>"

    [dstack]                                  # from the replayed RTMR3 event log
    compose_hashes = ["<64 hex>"]
    app_ids = []                              # empty: any app id

    [sgx]                                     # a non-empty list must contain the value
    mrenclave = ["<64 hex>"]
    mrsigner = []
    isvprodid = 1                             # required when only MRSIGNER is listed
    min_isvsvn = 0

    [[manifests]]                             # expected shard manifest hashes
    model = "TinyLlama-1.1B"                  # optional: any model name if absent
    layers = "0:11"
    hash = "<64 hex>"

An empty list allows nothing: a TDX quote is refused unless its MRTD and RTMR0-2
are all listed, and an SGX quote unless its MRENCLAVE or MRSIGNER is listed. RTMR3
measures the software of the TD (for dstack, the whole app), so every TDX policy
must constrain it: by dstack compose hashes replayed from the event log, by an
``rtmr3`` list, or by an explicit ``allow_any_rtmr3 = true``; a file that lists TDX
measurements and does none of these is refused when loaded, and a TDX quote is
refused by any policy that does none of these. An MRSIGNER-only SGX policy must
name the ISVPRODID (a signer signs many enclaves). Unknown keys are errors, so a
typo cannot silently weaken a policy. :meth:`Policy.warnings` names what a policy
leaves open that a person should know about.
"""

from __future__ import annotations

import json
import logging
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from teeshard.attest.encoding import check_fields, from_hex
from teeshard.attest.errors import FormatError, PolicyError
from teeshard.model.layer_range import LayerRange

log = logging.getLogger(__name__)

TCB_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
)
RTMR3_RULE = (
    "a TDX policy must constrain RTMR3 (the software of the TD): list dstack.compose_hashes "
    "(replayed from the event log), tdx.rtmr3 values, or set tdx.allow_any_rtmr3 = true"
)
_TOP = (
    "allowed_tcb_statuses", "allowed_advisory_ids", "allow_debug", "allow_simulated",
    "simulated_keys", "max_evidence_age_s", "tdx", "dstack", "sgx", "manifests", "offload",
    "accelerator_keys",
)  # fmt: skip
# What a policy may require of a node's TSQP offload (checked by ``teeshard.offload``):
# "protected" (the default) refuses only the plain mode, which shows activations.
OFFLOAD_REQUIREMENTS = ("any", "protected", "blinded", "verified", "blinded+verified", "forbid")
_TDX = (
    "mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "allow_any_rtmr3", "mrconfigid", "xfam",
    "td_attributes_mask", "td_attributes",
)  # fmt: skip
_SGX = ("mrenclave", "mrsigner", "isvprodid", "min_isvsvn")


@dataclass(frozen=True)
class ManifestExpectation:
    layers: LayerRange
    manifest_hash: bytes
    model: str | None = None  # None matches any model name


@dataclass(frozen=True)
class Policy:
    allowed_tcb_statuses: frozenset[str] = frozenset({"UpToDate"})
    allowed_advisory_ids: frozenset[str] = frozenset()
    allow_debug: bool = False
    allow_simulated: bool = False
    simulated_keys: frozenset[bytes] = frozenset()
    max_evidence_age_s: int = 300
    mrtd: frozenset[bytes] = frozenset()
    rtmr0: frozenset[bytes] = frozenset()
    rtmr1: frozenset[bytes] = frozenset()
    rtmr2: frozenset[bytes] = frozenset()
    rtmr3: frozenset[bytes] = frozenset()
    allow_any_rtmr3: bool = False
    mrconfigid: frozenset[bytes] = frozenset()
    xfam: frozenset[bytes] = frozenset()
    td_attributes_mask: bytes | None = None
    td_attributes: bytes | None = None
    compose_hashes: frozenset[bytes] = frozenset()
    app_ids: frozenset[bytes] = frozenset()
    mrenclave: frozenset[bytes] = frozenset()
    mrsigner: frozenset[bytes] = frozenset()
    isvprodid: int | None = None
    min_isvsvn: int = 0
    manifests: tuple[ManifestExpectation, ...] = field(default=())
    offload: str = "protected"  # one of OFFLOAD_REQUIREMENTS
    accelerator_keys: tuple[str, ...] = ()  # allowed accelerator key fingerprints (hex); any

    @property
    def lists_tdx(self) -> bool:
        """The policy names TDX measurements (it means to accept some TDX quotes)."""
        return bool(self.mrtd or self.rtmr0 or self.rtmr1 or self.rtmr2)

    @property
    def constrains_rtmr3(self) -> bool:
        return bool(self.compose_hashes or self.rtmr3 or self.allow_any_rtmr3)

    @property
    def mrsigner_only(self) -> bool:
        return bool(self.mrsigner) and not self.mrenclave

    def problems(self) -> list[str]:
        """What makes this policy unusable (empty when it is consistent); pure."""
        found = []
        if self.lists_tdx and not self.constrains_rtmr3:
            found.append(RTMR3_RULE)
        if self.allow_any_rtmr3 and (self.compose_hashes or self.rtmr3):
            found.append("tdx.allow_any_rtmr3 = true contradicts listed RTMR3 constraints")
        if self.mrsigner_only and self.isvprodid is None:
            found.append(
                "an SGX policy listing only MRSIGNER must name sgx.isvprodid "
                "(the signer's other enclaves would pass)"
            )
        mask, value = self.td_attributes_mask, self.td_attributes
        if (mask is None) != (value is None):
            found.append("tdx.td_attributes_mask and tdx.td_attributes go together")
        elif (
            mask is not None
            and value is not None
            and any(v & ~m for v, m in zip(value, mask, strict=True))
        ):
            found.append("tdx.td_attributes sets bits outside tdx.td_attributes_mask")
        return found

    def warnings(self) -> list[str]:
        """What this (valid) policy leaves open that a person should know about; pure."""
        found = []
        if self.allow_simulated and not self.simulated_keys:
            found.append(
                "the policy accepts INSECURE simulated evidence from ANY key: pin the "
                "expected one with simulated_keys"
            )
        if self.allow_any_rtmr3:
            found.append("tdx.allow_any_rtmr3: the software running in a TD is not checked")
        if self.allow_debug:
            found.append("allow_debug: debug TDs/enclaves, whose memory the host reads, pass")
        return found

    def expected_manifest(self, model: str, layers: LayerRange) -> bytes | None:
        """The expected manifest hash for ``model`` at ``layers``, if the policy names one."""
        for item in self.manifests:
            if item.layers == layers and item.model in (None, model):
                return item.manifest_hash
        return None

    def allowing_simulated(self) -> Policy:
        return replace(self, allow_simulated=True)

    def pinning_simulated(self, *keys: bytes) -> Policy:
        """This policy, accepting simulated evidence from exactly ``keys`` (and no other)."""
        return replace(self, allow_simulated=True, simulated_keys=frozenset(keys))

    @classmethod
    def load(cls, path: str | Path | None, *, allow_simulated: bool = False) -> Policy:
        """The policy at ``path`` (without one: the strict default), as a node or CLI takes it.

        ``allow_simulated`` accepts INSECURE simulated evidence whatever the file says.
        Each of :meth:`warnings` is logged.
        """
        policy = cls._read(Path(path)) if path is not None else cls()
        policy = policy.allowing_simulated() if allow_simulated else policy
        for warning in policy.warnings():
            log.warning("policy %s: %s", path or "(default)", warning)
        return policy

    @classmethod
    def _read(cls, path: Path) -> Policy:
        try:
            text = path.read_text()
        except OSError as exc:
            raise PolicyError(f"cannot read policy {path}: {exc}") from None
        try:
            data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except ValueError as exc:
            raise PolicyError(f"policy {path} does not parse: {exc}") from None
        return cls.from_mapping(data, str(path))

    @classmethod
    def from_mapping(cls, data: object, what: str = "policy") -> Policy:
        """Parse and check a policy; PolicyError names the first problem."""
        try:
            policy = _parse(data, what)
        except PolicyError:
            raise
        except FormatError as exc:
            raise PolicyError(str(exc)) from None
        problems = policy.problems()
        if problems:
            raise PolicyError(f"{what}: {problems[0]}")
        return policy


def _hex_set(
    section: Mapping[str, Any], key: str, what: str, length: int | None
) -> frozenset[bytes]:
    values = section.get(key, [])
    if not isinstance(values, list):
        raise PolicyError(f"{what}.{key}: expected a list of hex strings")
    return frozenset(from_hex(v, f"{what}.{key}", length) for v in values)


def _hex_opt(section: Mapping[str, Any], key: str, what: str, length: int) -> bytes | None:
    value = section.get(key)
    return None if value is None else from_hex(value, f"{what}.{key}", length)


def _flag(section: Mapping[str, Any], key: str, what: str) -> bool:
    value = section.get(key, False)
    if not isinstance(value, bool):
        raise PolicyError(f"{what}.{key}: expected true or false")
    return value


def _uint(section: Mapping[str, Any], key: str, what: str, bits: int) -> int | None:
    value = section.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << bits:
        raise PolicyError(f"{what}.{key}: expected an integer from 0 to {(1 << bits) - 1}")
    return value


def _strings(section: Mapping[str, Any], key: str, what: str) -> frozenset[str]:
    values = section.get(key, [])
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise PolicyError(f"{what}.{key}: expected a list of strings")
    return frozenset(values)


def _parse(data: object, what: str) -> Policy:
    top = check_fields(data, what, (), _TOP)
    statuses = top.get("allowed_tcb_statuses", ["UpToDate"])
    if not isinstance(statuses, list) or any(s not in TCB_STATUSES for s in statuses):
        raise PolicyError(f"{what}.allowed_tcb_statuses: each must be one of {TCB_STATUSES}")
    max_age = top.get("max_evidence_age_s", 300)
    if not isinstance(max_age, int) or isinstance(max_age, bool) or max_age <= 0:
        raise PolicyError(f"{what}.max_evidence_age_s: expected a positive integer")
    tdx = check_fields(top.get("tdx", {}), f"{what}.tdx", (), _TDX)
    dstack = check_fields(
        top.get("dstack", {}), f"{what}.dstack", (), ("compose_hashes", "app_ids")
    )
    sgx = check_fields(top.get("sgx", {}), f"{what}.sgx", (), _SGX)
    raw_manifests = top.get("manifests", [])
    if not isinstance(raw_manifests, list):
        raise PolicyError(f"{what}.manifests: expected a list of tables")
    w_tdx, w_sgx = f"{what}.tdx", f"{what}.sgx"
    offload = top.get("offload", "protected")
    if offload not in OFFLOAD_REQUIREMENTS:
        raise PolicyError(f"{what}.offload: must be one of {', '.join(OFFLOAD_REQUIREMENTS)}")
    return Policy(
        offload=offload,
        accelerator_keys=tuple(sorted(_strings(top, "accelerator_keys", what))),
        allowed_tcb_statuses=frozenset(statuses),
        allowed_advisory_ids=_strings(top, "allowed_advisory_ids", what),
        allow_debug=_flag(top, "allow_debug", what),
        allow_simulated=_flag(top, "allow_simulated", what),
        simulated_keys=_hex_set(top, "simulated_keys", what, 32),
        max_evidence_age_s=max_age,
        mrtd=_hex_set(tdx, "mrtd", w_tdx, 48),
        rtmr0=_hex_set(tdx, "rtmr0", w_tdx, 48),
        rtmr1=_hex_set(tdx, "rtmr1", w_tdx, 48),
        rtmr2=_hex_set(tdx, "rtmr2", w_tdx, 48),
        rtmr3=_hex_set(tdx, "rtmr3", w_tdx, 48),
        allow_any_rtmr3=_flag(tdx, "allow_any_rtmr3", w_tdx),
        mrconfigid=_hex_set(tdx, "mrconfigid", w_tdx, 48),
        xfam=_hex_set(tdx, "xfam", w_tdx, 8),
        td_attributes_mask=_hex_opt(tdx, "td_attributes_mask", w_tdx, 8),
        td_attributes=_hex_opt(tdx, "td_attributes", w_tdx, 8),
        compose_hashes=_hex_set(dstack, "compose_hashes", f"{what}.dstack", 32),
        app_ids=_hex_set(dstack, "app_ids", f"{what}.dstack", None),
        mrenclave=_hex_set(sgx, "mrenclave", w_sgx, 32),
        mrsigner=_hex_set(sgx, "mrsigner", w_sgx, 32),
        isvprodid=_uint(sgx, "isvprodid", w_sgx, 16),
        min_isvsvn=_uint(sgx, "min_isvsvn", w_sgx, 16) or 0,
        manifests=tuple(
            _manifest(m, f"{what}.manifests[{i}]") for i, m in enumerate(raw_manifests)
        ),
    )


def _manifest(item: object, what: str) -> ManifestExpectation:
    fields = check_fields(item, what, ("layers", "hash"), ("model",))
    model = fields.get("model")
    if model is not None and not isinstance(model, str):
        raise PolicyError(f"{what}.model: expected a string")
    try:
        layers = LayerRange.parse(str(fields["layers"]))
    except ValueError as exc:
        raise PolicyError(f"{what}.layers: {exc}") from None
    return ManifestExpectation(layers, from_hex(fields["hash"], f"{what}.hash", 32), model)
