from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from teeshard.model import demo
from teeshard.model.checkpoint import Checkpoint


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_demo_is_built_once_and_identically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEESHARD_HOME", str(tmp_path / "a"))
    first = demo.ensure_demo()
    assert demo.ensure_demo() == first  # cached
    monkeypatch.setenv("TEESHARD_HOME", str(tmp_path / "b"))
    second = demo.ensure_demo()
    assert first != second and digest(first) == digest(second)
    checkpoint = Checkpoint(first)
    assert checkpoint.spec.model_type == "llama" and checkpoint.spec.num_layers == 8


def test_demo_tokenizer_loads_with_transformers_and_has_a_chat_template(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoTokenizer

    monkeypatch.setenv("TEESHARD_HOME", str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(str(demo.ensure_demo()))
    text = "Hello world, how are you?"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered.endswith("<|assistant|>\n") and "hi</s>" in rendered
