"""Fixtures of the entry's grammar and tool tests: a small trained tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from teeshard.model.random_checkpoint import train_tokenizer, write_tokenizer


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    out: Path = tmp_path_factory.mktemp("tok")
    write_tokenizer(train_tokenizer(vocab_size=512), out)
    return AutoTokenizer.from_pretrained(str(out))
