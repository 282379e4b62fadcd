"""Shared fixtures: tiny randomly initialised checkpoints built by the tests themselves."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.checkpoints import TinyModel, build_tiny_model


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep demo builds and caches out of the user's home directory."""
    previous = os.environ.get("TEESHARD_HOME")
    os.environ["TEESHARD_HOME"] = str(tmp_path_factory.mktemp("teeshard-home"))
    yield
    if previous is None:
        os.environ.pop("TEESHARD_HOME", None)
    else:
        os.environ["TEESHARD_HOME"] = previous


@pytest.fixture(scope="session", autouse=True)
def _one_int8_kernel() -> Iterator[None]:
    """Int8 shards loaded by different tests (and node processes) use the same kernel,
    so comparisons between them do not depend on which kernel a timing favoured."""
    from teeshard.model import native
    from teeshard.model.quantize import KERNEL_ENV

    previous = os.environ.get(KERNEL_ENV)
    os.environ[KERNEL_ENV] = previous or ("native" if native.available() else "torch")
    yield
    if previous is None:
        os.environ.pop(KERNEL_ENV, None)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build_tiny_model("qwen2", tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_model(
    request: pytest.FixtureRequest, tiny_llama: TinyModel, tiny_qwen2: TinyModel
) -> TinyModel:
    return tiny_llama if request.param == "llama" else tiny_qwen2


def model_dir(model: TinyModel) -> Path:
    return model.path
