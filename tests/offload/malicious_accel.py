"""A malicious accelerator, run as its own process: the real server with its products tampered.

    python -m tests.offload.malicious_accel --tamper flip|stale|swap|none ARGS-OF-teeshard-accel

``flip``: one element of every product changed by a random nonzero amount;
``stale``: every product is the answer to the previous request (the first is honest);
``swap``: the product of another group's matrix of the same shape.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading

import torch

from teeshard.model.layer_range import LayerRange
from teeshard.offload import field as gf
from teeshard.offload import messages as wire
from teeshard.offload.keys import KeyPair, load_key_pair
from teeshard.offload.server import Accelerator, serve


class MaliciousAccelerator(Accelerator):
    tamper: str = "none"
    previous: dict[tuple[str, int], torch.Tensor] | None = None

    def compute(self, request: wire.MatmulRequest) -> torch.Tensor:
        x = wire.from_wire(request.x, 2)
        honest = self.matmul(request.group, x)
        if self.tamper == "flip":
            out = honest.clone()
            row, col = random.randrange(out.shape[0]), random.randrange(out.shape[1])
            if out.dtype == torch.int64:
                out[row, col] = (out[row, col] + random.randrange(1, gf.P)) % gf.P
            else:
                out[row, col] += 1.0
            return out
        if self.tamper == "stale":  # the previous answer for this group and row count
            if self.previous is None:
                self.previous = {}
            key = (request.group, int(x.shape[0]))
            stale = self.previous.get(key)
            self.previous[key] = honest
            return honest if stale is None else stale
        if self.tamper == "swap":
            shape = self.weights[request.group].shape
            for name, weight in self.weights.items():
                if name != request.group and weight.shape == shape:
                    return self.matmul(name, x)
        return honest


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tamper", default="none", choices=("none", "flip", "stale", "swap"))
    parser.add_argument("--model", required=True)
    parser.add_argument("--layers", required=True, type=LayerRange.parse)
    parser.add_argument("--arith", default="field")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bind", default="tcp://127.0.0.1:*")
    parser.add_argument("--key", default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    honest = Accelerator.load(args.model, args.layers, args.arith, args.device)
    accel = MaliciousAccelerator(
        **{
            f: getattr(honest, f)
            for f in ("model", "layers", "arith", "device", "weights", "embedding")
        }
    )
    accel.tamper = args.tamper
    keys = load_key_pair(args.key) if args.key else KeyPair.generate()

    def ready(endpoint: str) -> None:
        print(json.dumps({"endpoint": endpoint, "public_key": keys.public.decode(),
                          "fingerprint": keys.fingerprint}), flush=True)  # fmt: skip

    serve(accel, args.bind, keys, stop=threading.Event(), on_ready=ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())
