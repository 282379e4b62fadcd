"""The attestation commands, run through ``teeshard.cli.main`` (a real HTTP node on loopback)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from teeshard.attest.attester import NodeAttestation
from teeshard.attest.errors import FormatError
from teeshard.attest.manifest import ShardManifest, compute_manifest
from teeshard.cli import main
from teeshard.model.checkpoint import Checkpoint
from teeshard.model.layer_range import LayerRange
from tests.attest.helpers import DATA, VECTOR_TIME, NodeFactory


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def test_manifest_command(capsys: pytest.CaptureFixture[str], llama_dir: Path) -> None:
    expected = compute_manifest(Checkpoint(llama_dir), LayerRange(0, 2), "float32")
    code, out = run(capsys, "manifest", "--model", str(llama_dir), "--layers", "0:2")
    assert code == 0 and f"manifest: {expected.combined_hash.hex()}" in out
    code, out = run(capsys, "manifest", "--model", str(llama_dir), "--layers", "0:2", "--json")
    assert code == 0 and ShardManifest.from_json(json.loads(out)) == expected


def test_verify_quote_command(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    quote, collateral = str(DATA / "tdx_quote"), str(DATA / "tdx_quote_collateral.json")
    code, out = run(capsys, "verify-quote", quote, "--collateral", collateral,
                    "--now", str(VECTOR_TIME))  # fmt: skip
    assert code == 0 and "PASS: TDX quote, TCB status UpToDate" in out and "mrtd: 91eb2b" in out
    code, out = run(
        capsys, "verify-quote", quote, "--collateral", collateral, "--now", "1800000000"
    )
    assert code == 1 and out.startswith("FAIL: quote rejected")
    policy = tmp_path / "policy.toml"
    policy.write_text('[tdx]\nallow_any_rtmr3 = true\nmrtd = ["' + "00" * 48 + '"]\n')
    code, out = run(capsys, "verify-quote", quote, "--collateral", collateral,
                    "--now", str(VECTOR_TIME), "--policy", str(policy))  # fmt: skip
    assert code == 1 and "FAIL: MRTD 91eb2b" in out


class _Handler(BaseHTTPRequestHandler):
    node: NodeAttestation

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        try:
            assert parts.path == "/v1/attestation"
            body = json.dumps(self.node.bundle_json(parse_qs(parts.query)["nonce"][0])).encode()
            self.send_response(200)
        except (FormatError, KeyError, AssertionError):
            body = b"{}"
            self.send_response(400)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def node_url(
    make_node: NodeFactory, manifests: dict[str, ShardManifest]
) -> Iterator[tuple[str, NodeAttestation]]:
    node = make_node(manifests["0:2"])
    handler = type("Handler", (_Handler,), {"node": node})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", node
    server.shutdown()
    server.server_close()


def test_verify_command(
    capsys: pytest.CaptureFixture[str], node_url: tuple[str, NodeAttestation], tmp_path: Path
) -> None:
    url, node = node_url
    manifest_hash = node.manifest.combined_hash.hex()
    code, out = run(capsys, "verify", url, "--expect-manifest", manifest_hash)
    assert code == 1 and "FAIL: simulated evidence" in out and "--allow-simulated" in out
    saved = tmp_path / "bundle.json"
    code, out = run(capsys, "verify", url, "--allow-simulated", "--expect-manifest",
                    manifest_hash, "--save-bundle", str(saved))  # fmt: skip
    assert code == 0 and out.startswith(f"PASS: {url}") and "INSECURE" in out
    assert json.loads(saved.read_text())["manifest"]["combined_hash"] == manifest_hash
    code, out = run(capsys, "verify", url, "--allow-simulated", "--expect-manifest", "00" * 32)
    assert code == 1 and "is not the expected" in out
    code, out = run(capsys, "verify", "http://127.0.0.1:9/", "--allow-simulated")
    assert code == 1 and "cannot fetch" in out
