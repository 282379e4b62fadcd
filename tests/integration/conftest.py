"""A shared two-node cluster of the tiny Llama for the API tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.checkpoints import TinyModel
from tests.cluster import LocalCluster


@pytest.fixture(scope="module")
def cluster(tiny_llama: TinyModel) -> Iterator[LocalCluster]:
    with LocalCluster(tiny_llama.path, 2) as running:
        yield running
