"""The package's shape stays as designed: layers that import only downwards, and one
chat request readable in a handful of files.

``LAYERS`` is the dependency order of ``teeshard``'s top-level packages and
modules, bottom first. A module may import its own package and anything in a
lower layer; an import of a package in the same layer (siblings) or a higher one
fails this test, wherever it is written (top level, inside a function, or under
``TYPE_CHECKING``: a lazy dependency is still a dependency). A new top-level
package must be given a place here.
"""

from __future__ import annotations

import ast
import asyncio
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

import teeshard

PACKAGE = Path(teeshard.__file__).parent
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"paths", "procutil"}),
    frozenset({"model"}),
    frozenset({"transport"}),
    frozenset({"attest"}),
    frozenset({"ledger", "offload"}),
    frozenset({"node"}),
    frozenset({"entry"}),
    frozenset({"server"}),
    frozenset({"cli"}),
)
RANK = {name: rank for rank, layer in enumerate(LAYERS) for name in layer}
# ``teeshard/__init__.py`` is the library's front door: it re-exports from every layer.
FACADE = PACKAGE / "__init__.py"


def top_level(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imported_packages(path: Path) -> Iterator[tuple[int, str]]:
    """(line, top-level teeshard package) for every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "teeshard":
                names = [f"teeshard.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "teeshard" and len(parts) > 1:
                yield node.lineno, parts[1]


def forbidden_edges() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == FACADE:
            continue
        source = top_level(path)
        if source not in RANK:
            problems.append(f"{path.relative_to(PACKAGE)}: package {source!r} has no layer")
            continue
        for line, target in imported_packages(path):
            if target == source:
                continue
            if target not in RANK:
                problems.append(f"{path.relative_to(PACKAGE)}:{line} imports unknown {target!r}")
            elif RANK[target] >= RANK[source]:
                problems.append(
                    f"{path.relative_to(PACKAGE)}:{line}: {source} (layer {RANK[source]}) "
                    f"imports {target} (layer {RANK[target]})"
                )
    return problems


def test_every_import_points_down_a_layer() -> None:
    assert forbidden_edges() == []


def test_the_check_catches_an_upward_import(tmp_path: Path, monkeypatch: Any) -> None:
    """The walker really sees imports: an upward one planted in a copy is reported."""
    fake = tmp_path / "teeshard"
    (fake / "model").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "model" / "bad.py").write_text(
        "def f():\n    from teeshard.entry.errors import APIError\n    return APIError\n"
    )
    (fake / "ledger").mkdir()
    (fake / "ledger" / "sibling.py").write_text("import teeshard.offload.client\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    monkeypatch.setattr(sys.modules[__name__], "FACADE", fake / "__init__.py")
    problems = forbidden_edges()
    assert any("model/bad.py:2: model (layer 1) imports entry" in p for p in problems)
    assert any("ledger/sibling.py:1: ledger (layer 4) imports offload" in p for p in problems)


def test_every_public_name_resolves() -> None:
    for name in teeshard.__all__:
        assert getattr(teeshard, name) is not None, name
    import teeshard.attest as attest
    from teeshard.attest import errors

    tree = {n for n in dir(errors) if isinstance(getattr(errors, n), type)}
    tree = {n for n in tree if issubclass(getattr(errors, n), errors.AttestationError)}
    assert tree <= set(attest.__all__), "teeshard.attest exports its whole error tree"


# -- one request's path ---------------------------------------------------------------

# Ten when issue 7 set the bound. Since then six stages of their own joined the path:
# the admission queue (entry/admission.py), batching (node/scheduler.py), the linears of
# every format (model/linears.py) on teeshard's kernels (model/native/__init__.py: the
# float32 default's too), the decoding sessions' attention in one native call
# (model/native/attention.py) and the norms and rotary pass in one call each
# (model/native/block_ops.py). README "How it works" lists it.
MAX_FILES_ON_THE_PATH = 16


class PathRecorder:
    """Records the teeshard files that run from the chat route until a token is sampled.

    On the route's thread a frame counts only when the route is among its callers:
    resuming a coroutine reports every frame awaiting it, the middleware that called
    the route included, and those are not on the path. The compute thread runs only
    work the route started, so its frames count while the recording is on.
    """

    def __init__(self) -> None:
        self.recording = False
        self.done = False
        self.route_thread: int | None = None
        self.files: set[str] = set()

    def __call__(self, frame: FrameType, event: str, _: object) -> None:
        if event not in ("call", "return") or self.done:
            return
        code = frame.f_code
        if event == "call" and code.co_name == "chat_completions":
            self.recording, self.route_thread = True, threading.get_ident()
        if not self.recording or not code.co_filename.startswith(str(PACKAGE)):
            return
        if threading.get_ident() == self.route_thread and not _below_the_route(frame):
            return
        self.files.add(str(Path(code.co_filename).relative_to(PACKAGE)))
        if event == "return" and code.co_name == "sample":
            self.recording, self.done = False, True


def _below_the_route(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_name == "chat_completions":
            return True
        frame = frame.f_back
    return False


def test_one_chat_request_reads_in_sixteen_files(tiny_llama: Any, tmp_path: Path) -> None:
    from teeshard.model import Checkpoint
    from teeshard.server import NodeConfig, build_node, write_local_policy

    checkpoint = Checkpoint(tiny_llama.path)
    layers = teeshard.LayerRange(0, checkpoint.spec.num_layers)
    policy = write_local_policy(tmp_path / "policy.toml", checkpoint, [layers], "float32", "tiny")
    config = NodeConfig(
        model_dir=tiny_llama.path,
        layers=layers,
        entry=True,
        model_name="tiny",
        tee="simulated",
        policy_path=policy,
        manifest_cache=False,
    )
    node = build_node(config)  # a fresh node: its compute thread starts with the request
    recorder = PathRecorder()

    async def ask() -> httpx.Response:
        transport = httpx.ASGITransport(app=node.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://entry") as client:
            return await client.post(
                "/v1/chat/completions",
                json={
                    "model": "tiny",
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 2,
                },
            )

    threading.setprofile(recorder)
    sys.setprofile(recorder)
    try:
        response = asyncio.run(ask())
    finally:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]
    assert response.status_code == 200, response.text
    assert recorder.done, "the recorder never saw a token sampled"
    assert "entry/routes.py" in recorder.files and "model/sampling.py" in recorder.files
    assert len(recorder.files) <= MAX_FILES_ON_THE_PATH, " ".join(sorted(recorder.files))
