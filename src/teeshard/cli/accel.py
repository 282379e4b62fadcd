"""``teeshard accel``: the untrusted accelerator server of TSQP mode (runs outside the TEE).

    teeshard accel --keygen DIR                       # DIR/accel.key, DIR/accel.key_secret
    teeshard accel --model DIR --layers 0:11 --key DIR/accel.key_secret \\
        --bind tcp://127.0.0.1:7100 [--device cuda:0] [--arith field|float]

When ready it prints one JSON line on stdout: ``{"endpoint": ..., "public_key": ...,
"fingerprint": ...}``; the node pins ``public_key`` with ``--accel-key``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from pathlib import Path

from teeshard.cli.errors import CommandError
from teeshard.model.layer_range import LayerRange


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "accel", help="serve matrix products to a TEE node (TSQP mode; untrusted, outside the TEE)"
    )
    parser.add_argument("--model", type=Path, help="Hugging Face checkpoint directory")
    parser.add_argument("--layers", type=LayerRange.parse, help="half-open range START:END")
    parser.add_argument(
        "--bind", default="tcp://127.0.0.1:7100", help="ZeroMQ endpoint (default %(default)s)"
    )
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:0 ...")
    parser.add_argument(
        "--arith",
        default="field",
        choices=("field", "float"),
        help="field: exact products mod p for blinded/verified nodes (default); "
        "float: plain float32 products for --offload-mode plain (INSECURE)",
    )
    parser.add_argument(
        "--key", type=Path, help="CURVE secret key file (default: a fresh key, printed at start)"
    )
    parser.add_argument(
        "--allow-clients",
        type=Path,
        help="directory of client public key files; only those clients may connect",
    )
    parser.add_argument("--keygen", type=Path, metavar="DIR", help="write a key pair and exit")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU device)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from teeshard.offload.keys import KeyPair, create_key_files, load_key_pair

    if args.keygen is not None:
        public, secret = create_key_files(args.keygen)
        keys = load_key_pair(secret)
        print(json.dumps({"public_key_file": str(public), "secret_key_file": str(secret),
                          "public_key": keys.public.decode(), "fingerprint": keys.fingerprint}))  # fmt: skip
        return 0
    if args.model is None or args.layers is None:
        raise CommandError("give --model and --layers (or --keygen DIR)")
    import torch

    from teeshard.offload.server import Accelerator, serve

    if args.threads:
        torch.set_num_threads(args.threads)
    keys = load_key_pair(args.key) if args.key is not None else KeyPair.generate()
    accel = Accelerator.load(args.model, args.layers, args.arith, args.device)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def ready(endpoint: str) -> None:
        line = {"endpoint": endpoint, "public_key": keys.public.decode(),
                "fingerprint": keys.fingerprint, "arith": args.arith, "layers": str(args.layers)}  # fmt: skip
        print(json.dumps(line), flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        serve(accel, args.bind, keys, allowed_clients=args.allow_clients, stop=stop, on_ready=ready)
    sys.stdout.flush()
    return 0
