"""Verification policy: which measurements, TCB statuses and shard manifests to accept.

A policy is a TOML or JSON file (by extension; ``.json`` is JSON, anything else TOML)::

    allowed_tcb_statuses = ["UpToDate"]       # default ["UpToDate"]
    allow_debug = false                       # debug TDs/enclaves: host can read memory
    allow_simulated = false                   # accept INSECURE simulated evidence
    simulated_keys = []                       # if non-empty, only these simulated keys (hex)
    max_evidence_age_s = 300                  # nonce signature must be younger than this

    [tdx]                                     # every value listed must match exactly
    mrtd = ["<96 hex>"]
    rtmr0 = ["<96 hex>"]
    rtmr1 = ["<96 hex>"]
    rtmr2 = ["<96 hex>"]

    [dstack]                                  # from the replayed RTMR3 event log
    compose_hashes = ["<64 hex>"]
    app_ids = []                              # empty: any app id

    [sgx]                                     # a non-empty list must contain the value
    mrenclave = ["<64 hex>"]
    mrsigner = []

    [[manifests]]                             # expected shard manifest hashes
    model = "TinyLlama-1.1B"                  # optional: any model name if absent
    layers = "0:11"
    hash = "<64 hex>"

An empty list allows nothing: a TDX quote is refused unless its MRTD and RTMR0-2
are all listed, dstack evidence unless its compose hash is listed, and an SGX quote
unless its MRENCLAVE or MRSIGNER is listed. Unknown keys are errors, so a typo
cannot silently weaken a policy.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from teeshard.attest.encoding import check_fields, from_hex
from teeshard.attest.errors import FormatError, PolicyError
from teeshard.model.layer_range import LayerRange

TCB_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
)


@dataclass(frozen=True)
class ManifestExpectation:
    layers: LayerRange
    manifest_hash: bytes
    model: str | None = None  # None matches any model name


@dataclass(frozen=True)
class Policy:
    allowed_tcb_statuses: frozenset[str] = frozenset({"UpToDate"})
    allow_debug: bool = False
    allow_simulated: bool = False
    simulated_keys: frozenset[bytes] = frozenset()
    max_evidence_age_s: int = 300
    mrtd: frozenset[bytes] = frozenset()
    rtmr0: frozenset[bytes] = frozenset()
    rtmr1: frozenset[bytes] = frozenset()
    rtmr2: frozenset[bytes] = frozenset()
    compose_hashes: frozenset[bytes] = frozenset()
    app_ids: frozenset[bytes] = frozenset()
    mrenclave: frozenset[bytes] = frozenset()
    mrsigner: frozenset[bytes] = frozenset()
    manifests: tuple[ManifestExpectation, ...] = field(default=())

    def expected_manifest(self, model: str, layers: LayerRange) -> bytes | None:
        """The expected manifest hash for ``model`` at ``layers``, if the policy names one."""
        for item in self.manifests:
            if item.layers == layers and item.model in (None, model):
                return item.manifest_hash
        return None

    def allowing_simulated(self) -> Policy:
        return replace(self, allow_simulated=True)

    @classmethod
    def load(cls, path: str | Path | None, *, allow_simulated: bool = False) -> Policy:
        """The policy at ``path`` (without one: the strict default), as a node or CLI takes it.

        ``allow_simulated`` accepts INSECURE simulated evidence whatever the file says.
        """
        policy = cls._read(Path(path)) if path is not None else cls()
        return policy.allowing_simulated() if allow_simulated else policy

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
        try:
            return _parse(data, what)
        except PolicyError:
            raise
        except FormatError as exc:
            raise PolicyError(str(exc)) from None


def _hex_set(
    section: Mapping[str, Any], key: str, what: str, length: int | None
) -> frozenset[bytes]:
    values = section.get(key, [])
    if not isinstance(values, list):
        raise PolicyError(f"{what}.{key}: expected a list of hex strings")
    return frozenset(from_hex(v, f"{what}.{key}", length) for v in values)


def _parse(data: object, what: str) -> Policy:
    top = check_fields(
        data,
        what,
        (),
        (
            "allowed_tcb_statuses", "allow_debug", "allow_simulated", "simulated_keys",
            "max_evidence_age_s", "tdx", "dstack", "sgx", "manifests",
        ),
    )  # fmt: skip
    statuses = top.get("allowed_tcb_statuses", ["UpToDate"])
    if not isinstance(statuses, list) or any(s not in TCB_STATUSES for s in statuses):
        raise PolicyError(f"{what}.allowed_tcb_statuses: each must be one of {TCB_STATUSES}")
    flags = {}
    for key in ("allow_debug", "allow_simulated"):
        flags[key] = top.get(key, False)
        if not isinstance(flags[key], bool):
            raise PolicyError(f"{what}.{key}: expected true or false")
    max_age = top.get("max_evidence_age_s", 300)
    if not isinstance(max_age, int) or isinstance(max_age, bool) or max_age <= 0:
        raise PolicyError(f"{what}.max_evidence_age_s: expected a positive integer")
    tdx = check_fields(top.get("tdx", {}), f"{what}.tdx", (), ("mrtd", "rtmr0", "rtmr1", "rtmr2"))
    dstack = check_fields(
        top.get("dstack", {}), f"{what}.dstack", (), ("compose_hashes", "app_ids")
    )
    sgx = check_fields(top.get("sgx", {}), f"{what}.sgx", (), ("mrenclave", "mrsigner"))
    raw_manifests = top.get("manifests", [])
    if not isinstance(raw_manifests, list):
        raise PolicyError(f"{what}.manifests: expected a list of tables")
    return Policy(
        allowed_tcb_statuses=frozenset(statuses),
        allow_debug=flags["allow_debug"],
        allow_simulated=flags["allow_simulated"],
        simulated_keys=_hex_set(top, "simulated_keys", what, 32),
        max_evidence_age_s=max_age,
        mrtd=_hex_set(tdx, "mrtd", f"{what}.tdx", 48),
        rtmr0=_hex_set(tdx, "rtmr0", f"{what}.tdx", 48),
        rtmr1=_hex_set(tdx, "rtmr1", f"{what}.tdx", 48),
        rtmr2=_hex_set(tdx, "rtmr2", f"{what}.tdx", 48),
        compose_hashes=_hex_set(dstack, "compose_hashes", f"{what}.dstack", 32),
        app_ids=_hex_set(dstack, "app_ids", f"{what}.dstack", None),
        mrenclave=_hex_set(sgx, "mrenclave", f"{what}.sgx", 32),
        mrsigner=_hex_set(sgx, "mrsigner", f"{what}.sgx", 32),
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
