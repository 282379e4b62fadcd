"""``teeshard manifest``, ``verify``, ``verify-quote`` and ``verify-receipt``.

Verification commands print ``PASS`` and what was verified, or ``FAIL: <reason>``
and exit with status 1. Simulated evidence is always flagged INSECURE.
"""

from __future__ import annotations

import argparse
import json
import secrets
import time
from pathlib import Path

import httpx

from teeshard.attest import (
    NONCE_BYTES,
    AttestationError,
    Bundle,
    Evidence,
    ManifestCache,
    Policy,
    compute_manifest,
    fetch_chain,
    load_receipts,
    verify_chain,
)
from teeshard.attest.verify.bundle import VerifiedNode, check_report, verify_bundle
from teeshard.attest.verify.quote import (
    CollateralSource,
    collateral_source,
    read_quote_file,
    verify_quote,
)
from teeshard.model.checkpoint import Checkpoint
from teeshard.model.layer_range import LayerRange

DEFAULT_PCCS = "https://pccs.phala.network"  # any PCCS works: collateral is signed by Intel


def register(subparsers: argparse._SubParsersAction) -> None:
    manifest = subparsers.add_parser("manifest", help="print the shard manifest of layers A:B")
    manifest.add_argument("--model", required=True, type=Path, help="checkpoint directory")
    manifest.add_argument("--layers", required=True, type=LayerRange.parse, help="START:END")
    manifest.add_argument("--dtype", default="float32", help="compute dtype (default float32)")
    manifest.add_argument("--model-name", help="model name (default: directory name)")
    manifest.add_argument("--no-cache", action="store_true", help="rehash every tensor")
    manifest.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
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

    receipt = subparsers.add_parser("verify-receipt", help="verify a receipt chain offline")
    receipt.add_argument("file", type=Path, help="receipts JSON, or a response holding them")
    bundles = receipt.add_mutually_exclusive_group(required=True)
    bundles.add_argument("--bundle", action="append", type=Path, help="a stage's bundle (repeat)")
    bundles.add_argument(
        "--chain-url", help="fetch every stage's bundle from the entry node's attestation chain"
    )
    receipt.add_argument("--request-id", help="the request id the chain must be for")
    add_policy_options(receipt)
    receipt.set_defaults(func=run_verify_receipt)


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
    cache = None if args.no_cache else ManifestCache.for_checkpoint(args.model)
    manifest = compute_manifest(
        checkpoint, args.layers, args.dtype, model_name=args.model_name, cache=cache
    )
    if args.json:
        print(json.dumps(manifest.to_json(), indent=2))
        return 0
    print(f"model:    {manifest.model}")
    print(f"layers:   {manifest.layers} of {manifest.num_layers}")
    print(f"dtype:    {manifest.dtype}")
    print(f"tensors:  {len(manifest.tensors)}")
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


def _receipt_bundles(args: argparse.Namespace) -> list[tuple[str, Bundle]]:
    if args.bundle:
        return [(str(path), Bundle.loads(path.read_text())) for path in args.bundle]
    try:
        items = fetch_chain(args.chain_url, secrets.token_bytes(NONCE_BYTES))
    except httpx.HTTPError as exc:
        raise AttestationError(
            f"cannot fetch the attestation chain of {args.chain_url}: {exc}"
        ) from None
    return [(f"{args.chain_url} stage {i}", Bundle.from_json(item)) for i, item in enumerate(items)]


def run_verify_receipt(args: argparse.Namespace) -> int:
    policy = _policy(args)
    try:
        receipts = load_receipts(args.file.read_text())
        nodes = []
        for path, bundle in _receipt_bundles(args):
            # Offline: the bundle answers its own, old nonce; check it at the time it was made.
            expected = policy.expected_manifest(bundle.manifest.model, bundle.manifest.layers)
            if expected is None:
                print(f"note: {path}: no expected manifest in the policy; using the attested one")
            node = verify_bundle(
                bundle, policy, nonce=bundle.nonce, now=bundle.signed_at, check_freshness=False,
                expected_manifest_hash=expected or bundle.manifest.weights_hash,
                collateral=_collateral(args),
            )  # fmt: skip
            nodes.append(node)
        report = verify_chain(receipts, nodes, request_id=args.request_id)
    except AttestationError as exc:
        return _fail(exc)
    print(f"PASS: request {report.request_id}: {report.stages} stage(s), layers {report.layers}")
    print(f"  chain digest: {report.digest.hex()}")
    for node in nodes:
        if node.insecure:
            print(f"WARNING: stage layers {node.manifest.layers}: INSECURE simulated evidence")
    return 0
