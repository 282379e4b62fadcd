"""``teeshard verify-receipt``: does a saved answer's receipt chain prove *this* answer?

The rules are :func:`teeshard.attest.response.verify_response`'s; this command
gathers what they need: the stages' bundles (files, or fetched from the entry
node with a fresh nonce that bundle 0 must answer), the policy's expected
manifests, the attested tokenizer (``--model DIR``: its measured files must be
stage 0's entry section) and, optionally, the exact request body.
"""

from __future__ import annotations

import argparse
import json
import secrets
from pathlib import Path

import httpx

from teeshard.attest.client import NONCE_BYTES, fetch_chain
from teeshard.attest.entry_files import EntryFiles, hash_entry_files
from teeshard.attest.errors import AttestationError
from teeshard.attest.evidence import Bundle
from teeshard.attest.receipts import load_receipts, verify_chain
from teeshard.attest.response import Decode, ResponseReport, parse_choices, verify_response
from teeshard.attest.verify.bundle import VerifiedNode, verify_bundle
from teeshard.attest.verify.policy import Policy
from teeshard.cli.attest import _collateral, _fail, _policy, add_policy_options
from teeshard.model.spec import ArchSpec


def register(subparsers: argparse._SubParsersAction) -> None:
    receipt = subparsers.add_parser(
        "verify-receipt", help="check that a saved answer's receipt chain proves that answer"
    )
    receipt.add_argument(
        "file", type=Path, help="the saved response (JSON, or an SSE stream); or bare receipts"
    )
    bundles = receipt.add_mutually_exclusive_group(required=True)
    bundles.add_argument("--bundle", action="append", type=Path, help="a stage's bundle (repeat)")
    bundles.add_argument(
        "--chain-url",
        help="fetch every stage's bundle from the entry node (bundle 0 must answer a fresh nonce)",
    )
    receipt.add_argument(
        "--model", type=Path, help="checkpoint directory: its tokenizer must be the attested one"
    )
    receipt.add_argument(
        "--no-text-check", action="store_true",
        help="check the token ids but not the text (when the tokenizer files are not at hand)",
    )  # fmt: skip
    receipt.add_argument(
        "--request-body", type=Path, help="the exact request body sent: stage 0 must have got it"
    )
    receipt.add_argument("--request-id", help="the request (or response) id it must be for")
    receipt.add_argument(
        "--any-manifest", action="store_true",
        help="accept a stage whose layers have no expected manifest in the policy",
    )  # fmt: skip
    add_policy_options(receipt)
    receipt.set_defaults(func=run_verify_receipt)


def _bundles(args: argparse.Namespace) -> tuple[list[tuple[str, Bundle]], bytes | None]:
    """The stages' bundles, and the nonce bundle 0 must answer (None: offline files)."""
    if args.bundle:
        return [(str(path), Bundle.loads(path.read_text())) for path in args.bundle], None
    nonce = secrets.token_bytes(NONCE_BYTES)
    try:
        items = fetch_chain(args.chain_url, nonce)
    except httpx.HTTPError as exc:
        raise AttestationError(
            f"cannot fetch the attestation chain of {args.chain_url}: {exc}"
        ) from None
    named = [(f"{args.chain_url} stage {i}", Bundle.from_json(b)) for i, b in enumerate(items)]
    return named, nonce


def verify_stages(args: argparse.Namespace, policy: Policy) -> list[VerifiedNode]:
    named, nonce = _bundles(args)
    nodes = []
    for index, (where, bundle) in enumerate(named):
        expected = policy.expected_manifest(bundle.manifest.model, bundle.manifest.layers)
        if expected is None:
            if not args.any_manifest:
                raise AttestationError(
                    f"{where}: the policy names no expected manifest for {bundle.manifest.model} "
                    f"layers {bundle.manifest.layers} (pass --any-manifest to accept the attested one)"
                )
            print(f"note: {where}: no expected manifest in the policy; accepting the attested one")
        if index == 0 and nonce is not None:
            # fetched just now: the entry node's bundle must answer our nonce, fresh
            node = verify_bundle(
                bundle, policy, nonce=nonce, collateral=_collateral(args),
                expected_manifest_hash=expected or bundle.manifest.weights_hash,
            )  # fmt: skip
        else:
            # a stored bundle answers its own, old nonce; check it as of when it was made
            node = verify_bundle(
                bundle, policy, nonce=bundle.nonce, now=bundle.signed_at, check_freshness=False,
                expected_manifest_hash=expected or bundle.manifest.weights_hash,
                collateral=_collateral(args),
            )  # fmt: skip
        nodes.append(node)
    return nodes


def _tokenizer(model_dir: Path) -> tuple[Decode, set[int]]:
    from teeshard.entry.text import TextCodec  # the entry node's own decoding, exactly

    codec = TextCodec(model_dir)
    eos = codec.eos_ids() | set(ArchSpec.from_dir(model_dir).eos_token_ids)
    return codec.decode, eos


def run_verify_receipt(args: argparse.Namespace) -> int:
    if args.model is None and not args.no_text_check:
        return _fail(
            "give --model DIR (the checkpoint's tokenizer) to check the text, or --no-text-check"
        )
    policy = _policy(args)
    try:
        text = args.file.read_text()
        bare = isinstance(json.loads(text), list) if text.lstrip().startswith("[") else False
        nodes = verify_stages(args, policy)
        if bare:
            report = verify_chain(load_receipts(text), nodes, request_id=args.request_id)
            print(
                f"PASS: request {report.request_id}: {report.stages} stage(s), layers {report.layers}"
            )
            print("  note: bare receipts: no answer was checked against them")
            _warn_insecure(nodes)
            return 0
        entry_files, decode, eos = None, None, set[int]()
        if args.model is not None:
            entry_files = hash_entry_files(args.model)
            decode, eos = _tokenizer(args.model)
        body = args.request_body.read_bytes() if args.request_body is not None else None
        results = [
            verify_response(
                claims,
                nodes,
                entry_files=entry_files,
                decode=decode,
                eos_token_ids=eos,
                request_body=body,
                request_id=args.request_id,
            )
            for claims in parse_choices(text)
        ]
    except (AttestationError, UnicodeDecodeError) as exc:
        return _fail(exc)
    for index, result in enumerate(results):
        if len(results) > 1:
            print(f"choice {index}:")
        _print_report(result, entry_files)
    _warn_insecure(nodes)
    return 0


def _print_report(result: ResponseReport, entry_files: EntryFiles | None) -> None:
    chain = result.chain
    print(f"PASS: request {result.request_id}: {chain.stages} stage(s), layers {chain.layers}")
    print(f"  chain digest: {chain.digest.hex()}")
    print(f"  completion: {result.completion_tokens} token(s), the last stage's sent hash")
    if result.segments > 1:
        print(
            f"  route segments: {result.segments} (failed over); {result.partial_segments} "
            "stopped at a lost node and prove no tokens"
        )
    if result.text_checked:
        assert entry_files is not None
        print(
            f"  text: decoded from them by the attested tokenizer (entry {entry_files.hash.hex()})"
        )
    else:
        print("  text: NOT checked (--no-text-check)")
    if result.body_checked:
        print("  request body: what stage 0 received")
    else:
        print("  request body: not checked (no --request-body)")


def _warn_insecure(nodes: list[VerifiedNode]) -> None:
    for node in nodes:
        if node.insecure:
            print(f"WARNING: stage layers {node.manifest.layers}: INSECURE simulated evidence")
