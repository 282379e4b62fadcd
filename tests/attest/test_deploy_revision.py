"""The measured compose files download the model at a revision pinned by commit (item 6).

An environment variable is not part of dstack's compose hash, so a revision taken
from one is unmeasured: the files that decide the tokenizer and chat template
could change under a pinned compose hash. The revision is a literal commit hash.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE_FILES = sorted(DEPLOY.glob("docker-compose*.yml"))


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_model_revision_is_pinned_by_commit(path: Path) -> None:
    text = path.read_text()
    if "snapshot_download" not in text:
        pytest.skip(f"{path.name} downloads no model")
    revisions = re.findall(r"revision\s*=\s*(\S+?),?\n", text)
    assert revisions, f"{path.name}: snapshot_download without a revision"
    for revision in revisions:
        assert re.fullmatch(r'"[0-9a-f]{40}"', revision), f"{path.name}: revision {revision}"
    assert "MODEL_REVISION" not in text
