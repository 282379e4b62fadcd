#!/usr/bin/env python
"""Train the built-in demo model from the shipped corpus, deterministically, on CPU.

    python scripts/train_demo.py                  # rebuild src/teeshard/model/demo_model/...
    python scripts/train_demo.py --steps 20 --out /tmp/demo   # a quick look

Settings are teeshard.model.demo_train.TrainSettings (printed at the start and
written to training.json with the loss curve); same corpus, settings, torch
version and CPU kind give the same weights, bit for bit. The shipped model took
its 400 steps in 526 s on two shared cores (final loss 1.24).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from teeshard.model.demo import demo_dir
from teeshard.model.demo_train import TrainSettings, train, write_demo

PROMPTS = ("Hello! What is a TEE?", "What is attestation?", "How do I pay?")


def main() -> int:
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=demo_dir(), help="checkpoint directory")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    args = parser.parse_args()
    settings = dataclasses.replace(defaults, steps=args.steps, threads=args.threads)
    print(json.dumps(dataclasses.asdict(settings)), flush=True)

    def progress(step: int, loss: float, seconds: float) -> None:
        if step % 10 == 0 or step == settings.steps - 1:
            print(
                f"step {step + 1:4d}/{settings.steps}  loss {loss:.4f}  {seconds:6.1f} s",
                flush=True,
            )

    result = train(settings, progress=progress)
    write_demo(result, settings, args.out)
    record = json.loads((args.out / "training.json").read_text())
    print(
        f"wrote {args.out}: {record['parameters']:,} parameters, {record['epochs']} epochs, "
        f"final loss {record['final_loss_mean_last_20']}",
        flush=True,
    )

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(args.out))
    model = AutoModelForCausalLM.from_pretrained(str(args.out), dtype=torch.float32).eval()
    for prompt in PROMPTS:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=60, do_sample=False)
        answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        print(f"> {prompt}\n{answer}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
