"""``teeshard manifest``, ``verify`` and ``verify-quote`` (``verify-receipt``: its own module).

Verification commands print ``PASS`` and what was verified, or ``FAIL: <reason>``
and exit with status 1. Simulated evidence is always flagged INSECURE.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from teeshard.attest import (
    AttestationError,
    Evidence,
    ManifestCache,
    Policy,
    compute_manifest,
)
from teeshard.attest.verify.bundle import VerifiedNode, check_report
from teeshard.attest.verify.quote import (
    DEFAULT_PCCS_URL,
    CollateralSource,
    collateral_source,
    read_quote_file,
    verify_quote,
)
from teeshard.model.checkpoint import Checkpoint
from teeshard.model.formats import DTYPES, QUANTIZE_CHOICES, NumberFormat
from teeshard.model.layer_range import LayerRange

DEFAULT_PCCS = DEFAULT_PCCS_URL  # any PCCS works: collateral is signed by Intel


def register(subparsers: argparse._SubParsersAction) -> None:
    manifest = subparsers.add_parser("manifest", help="print the shard manifest of layers A:B")
    manifest.add_argument("--model", required=True, type=Path, help="checkpoint directory")
    manifest.add_argument("--layers", required=True, type=LayerRange.parse, help="START:END")
    manifest.add_argument(
        "--dtype", choices=tuple(DTYPES),
        help="the node's compute dtype (default float32; bfloat16 with --quantize)",
    )  # fmt: skip
    manifest.add_argument(
        "--quantize", choices=QUANTIZE_CHOICES, help="the node's --quantize (names its recipe)"
    )
    manifest.add_argument("--model-name", help="model name (default: directory name)")
    manifest.add_argument("--no-cache", action="store_true", help="rehash every tensor")
    manifest.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    manifest.add_argument(
        "--entry", action="store_true",
        help="the entry node's manifest: also measure the tokenizer, templates, generation config",
    )  # fmt: skip
    manifest.set_defaults(func=run_manifest)

    verify = subparsers.add_parser("verify", help="fetch and verify a node's attestation")
    verify.add_argument("url", help="node URL, e.g. https://host:8000 or wss://host:8000")
    verify.add_argument("--expect-manifest", help="expected manifest hash (hex)")
    verify.add_argument("--save-bundle", type=Path, help="write the verified bundle here")
    verify.add_argument(
        "--offload",
        dest="offload_policy",
        choices=("any", "protected", "blinded", "verified", "blinded+verified", "forbid"),
        help="require this TSQP offload mode of the node (forbid: TEE-only nodes only)",
    )
    add_policy_options(verify)
    verify.set_defaults(func=run_verify)

    quote = subparsers.add_parser("verify-quote", help="verify a TDX/SGX quote file offline")
    quote.add_argument("quote", type=Path, help="quote file, binary or hex")
    source = quote.add_mutually_exclusive_group(required=True)
    source.add_argument("--collateral", type=Path, help="collateral JSON file")
    source.add_argument("--pccs-url", help="fetch the collateral from this PCCS")
    quote.add_argument("--now", type=int, help="unix time to verify at (default: now)")
    quote.add_argument("--policy", type=Path, help="also check measurements against a policy")
    quote.add_argument("--event-log", type=Path, help="dstack event log JSON (RTMR3 replay)")
    quote.set_defaults(func=run_verify_quote)


def add_policy_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", type=Path, help="policy file (TOML or JSON)")
    parser.add_argument(
        "--allow-simulated", action="store_true", help="accept INSECURE simulated evidence"
    )
    parser.add_argument("--collateral", type=Path, help="cached collateral JSON file")
    parser.add_argument("--pccs-url", default=DEFAULT_PCCS, help=f"PCCS (default {DEFAULT_PCCS})")


def _policy(args: argparse.Namespace) -> Policy:
    return Policy.load(args.policy, allow_simulated=args.allow_simulated)


def _collateral(args: argparse.Namespace) -> CollateralSource:
    source = collateral_source(args.collateral, args.pccs_url)
    assert source is not None  # --pccs-url has a default
    return source


def _fail(exc: Exception | str) -> int:
    print(f"FAIL: {exc}")
    return 1


def _print_node(node: VerifiedNode) -> None:
    if node.insecure:
        print("WARNING: INSECURE simulated evidence: no TEE backs this node")
    for line in node.summary():
        print(f"  {line}")
    if node.manifest.offload is not None:
        from teeshard.offload.modes import OffloadAttestation

        statement = OffloadAttestation.from_json(dict(node.manifest.offload))
        if statement.mode.insecure:
            print("WARNING: INSECURE offload: activations leave the TEE in the clear")
        print(f"  {statement.describe()}")
    else:
        print("  offload: none (every product computed in the TEE)")


def run_manifest(args: argparse.Namespace) -> int:
    checkpoint = Checkpoint(args.model)
    number_format = NumberFormat.resolve(args.dtype, args.quantize)
    cache = None if args.no_cache else ManifestCache.for_checkpoint(args.model)
    manifest = compute_manifest(
        checkpoint, args.layers, number_format.dtype, model_name=args.model_name, cache=cache,
        entry_files=args.model if args.entry else None, quantize=number_format.quantize,
    )  # fmt: skip
    if args.json:
        print(json.dumps(manifest.to_json(), indent=2))
        return 0
    print(f"model:    {manifest.model}")
    print(f"layers:   {manifest.layers} of {manifest.num_layers}")
    print(f"dtype:    {manifest.dtype}")
    if manifest.quantize is not None:
        print(f"quantize: {manifest.quantize}")
    print(f"tensors:  {len(manifest.tensors)}")
    if manifest.entry is not None:
        print(f"entry:    {manifest.entry.hash.hex()}  ({len(manifest.entry.files)} files)")
    print(f"manifest: {manifest.combined_hash.hex()}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    import httpx

    from teeshard.attest import verify_url

    expected = bytes.fromhex(args.expect_manifest) if args.expect_manifest else None
    try:
        peer, bundle = verify_url(
            args.url, _policy(args), expected_manifest_hash=expected, collateral=_collateral(args)
        )
    except AttestationError as exc:
        return _fail(exc)
    except httpx.HTTPError as exc:
        return _fail(f"cannot fetch the attestation bundle: {exc}")
    if args.offload_policy is not None:
        from teeshard.offload import OffloadError, check_node_offload

        try:
            check_node_offload(args.offload_policy, peer.node.manifest.offload)
        except OffloadError as exc:
            return _fail(f"offload policy: {exc}")
    print(f"PASS: {args.url}")
    _print_node(peer.node)
    if args.save_bundle is not None:
        args.save_bundle.write_text(bundle.dumps())
    return 0


def run_verify_quote(args: argparse.Namespace) -> int:
    now = args.now if args.now is not None else int(time.time())
    try:
        quote = read_quote_file(args.quote)
        report = verify_quote(quote, _collateral(args), now)
        if args.policy is not None:
            event_log = args.event_log.read_text() if args.event_log else None
            provider = "dstack" if event_log is not None else "quote-file"
            evidence = Evidence(provider, report.tee_type, quote, report.report_data, event_log)
            check_report(report, evidence, Policy.load(args.policy))
    except AttestationError as exc:
        return _fail(exc)
    print(f"PASS: {report.tee_type.upper()} quote, TCB status {report.tcb_status}")
    print(f"  advisories: {', '.join(report.advisory_ids) or 'none'}")
    print(f"  debug: {report.debug}")
    for name, value in report.measurements().items():
        print(f"  {name}: {value}")
    print(f"  report_data: {report.report_data.hex()}")
    if args.policy is None:
        print("  (no --policy: measurements were shown, not checked)")
    return 0
