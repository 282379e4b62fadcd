"""``--dtype`` / ``--quantize`` on the command line: what node, up and manifest make of them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from teeshard.cli import build_parser, main
from teeshard.cli.node import config_from_args
from teeshard.cli.up import passthrough_options
from tests.checkpoints import TinyModel


def test_up_passes_the_format_to_every_node() -> None:
    args = build_parser().parse_args(["up", "--quantize", "int8"])
    options = passthrough_options(args)
    assert options[options.index("--dtype") + 1] == "bfloat16"  # int8 runs bfloat16 activations
    assert options[options.index("--quantize") + 1] == "int8"
    plain = passthrough_options(build_parser().parse_args(["up"]))
    assert plain[plain.index("--dtype") + 1] == "float32" and "--quantize" not in plain


def test_node_config_carries_the_format(tiny_llama: TinyModel) -> None:
    argv = ["node", "--model", str(tiny_llama.path), "--layers", "0:4", "--quantize", "int8"]
    args = build_parser().parse_args(argv)
    config = config_from_args(args, layers=args.layers)
    assert (config.dtype, config.quantize) == ("bfloat16", "int8")
    config.validate(4)
    with pytest.raises(ValueError, match="--dtype bfloat16"):
        config_from_args(build_parser().parse_args([*argv, "--dtype", "float32"]))
    with pytest.raises(ValueError, match="--dtype bfloat16"):
        replace(config, dtype="float32").validate(4)  # the config checks it too


def test_node_config_carries_the_inline_step_bound(tiny_llama: TinyModel) -> None:
    argv = ["node", "--model", str(tiny_llama.path), "--layers", "0:4"]
    args = build_parser().parse_args(argv)
    default = config_from_args(args, layers=args.layers)
    assert default.scheduler.inline_step_s == pytest.approx(0.05)
    off = build_parser().parse_args([*argv, "--inline-step-ms", "0"])
    assert config_from_args(off, layers=off.layers).scheduler.inline_step_s == 0
    negative = build_parser().parse_args([*argv, "--inline-step-ms", "-1"])
    with pytest.raises(ValueError, match="must not be negative"):
        config_from_args(negative, layers=negative.layers)


def test_manifest_refuses_int8_with_float32(
    tiny_llama: TinyModel, capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(Path(tiny_llama.path))
    argv = ["manifest", "--model", model, "--layers", "0:2", "--quantize", "int8"]
    assert main([*argv, "--dtype", "float32"]) == 2
    assert "--dtype bfloat16" in capsys.readouterr().err
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "dtype:    bfloat16" in out and "quantize: int8-weight-only/" in out


def test_manifest_names_the_w8a8_recipe(
    tiny_llama: TinyModel, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["manifest", "--model", str(tiny_llama.path), "--layers", "0:2", "--quantize"]
    assert main([*argv, "int8"]) == 0
    int8 = capsys.readouterr().out
    assert main([*argv, "w8a8"]) == 0
    w8a8 = capsys.readouterr().out
    assert "quantize: w8a8/weights:int8-weight-only/" in w8a8
    hashes = [line for line in (int8 + w8a8).splitlines() if line.startswith("manifest:")]
    assert len(hashes) == 2 and hashes[0] != hashes[1]  # each recipe its own hash


def test_plan_prints_each_formats_memory(
    tiny_llama: TinyModel, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps headers to the terminal otherwise
    assert main(["plan", "--model", str(tiny_llama.path), "--nodes", "2"]) == 0
    out = capsys.readouterr().out
    # int8 and w8a8 hold the same bytes: one column for both
    assert "float32 MiB" in out and "bfloat16 MiB" in out and "int8 / w8a8 MiB" in out
