"""Providers against fake TEE interfaces.

No TEE exists on the test machine, so the real providers are exercised against
stand-ins: a real HTTP server on a Unix socket speaking the dstack guest-agent and
tappd RPCs, and fake ``/dev/attestation`` and configfs-tsm directories (their roots
are parameters). The quotes they return are the real sample quotes with their
report_data field overwritten, so parsing is real while signatures are not checked
here (quote verification has its own tests).
"""

from __future__ import annotations

import json
import logging
import os
import socketserver
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import dcap_qvl
import pytest

from teeshard.attest.errors import ProviderError, ProviderUnavailable
from teeshard.attest.providers.detect import ProviderRoots, select_provider
from teeshard.attest.providers.dstack import DstackProvider
from teeshard.attest.providers.gramine import GramineProvider
from teeshard.attest.providers.simulated import MAGIC, SimulatedProvider
from teeshard.attest.providers.tsm import TsmProvider
from tests.attest.helpers import DATA

REPORT_DATA = bytes(range(64))
TDX_REPORT_DATA_AT = 48 + 584 - 64  # last field of the TD report body
SGX_REPORT_DATA_AT = 48 + 384 - 64  # last field of the enclave report body
EVENT_LOG = json.dumps([{"imr": 3, "event_type": 0x08000001, "digest": "", "event": "app-id",
                         "event_payload": "00"}])  # fmt: skip


def quote_for(name: str, report_data: bytes, at: int) -> bytes:
    quote = bytearray((DATA / name).read_bytes())
    quote[at : at + 64] = report_data
    assert bytes(dcap_qvl.parse_quote(bytes(quote)).report.report_data) == report_data
    return bytes(quote)


class FakeGuestAgent(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.answer_report_data: bytes | None = None  # None: echo what was asked
        super().__init__(path, _AgentHandler)


class _AgentHandler(BaseHTTPRequestHandler):
    server: FakeGuestAgent

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.server.requests.append((self.path, body))
        if self.path not in ("/GetQuote", "/prpc/Tappd.TdxQuote"):
            self.send_error(404)
            return
        asked = bytes.fromhex(body["report_data"])
        quote = quote_for("tdx_quote", self.server.answer_report_data or asked, TDX_REPORT_DATA_AT)
        payload = json.dumps({"quote": quote.hex(), "event_log": EVENT_LOG}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(dir="/tmp") as directory:  # short: sun_path limit
        yield Path(directory)


def serve_agent(path: Path) -> FakeGuestAgent:
    path.parent.mkdir(parents=True, exist_ok=True)
    agent = FakeGuestAgent(str(path))
    threading.Thread(target=agent.serve_forever, daemon=True).start()
    return agent


@pytest.mark.parametrize(
    ("socket_name", "provider", "rpc"),
    [
        ("dstack.sock", "dstack", "/GetQuote"),
        ("tappd.sock", "dstack-tappd", "/prpc/Tappd.TdxQuote"),
    ],
)
def test_dstack_guest_agent_and_tappd(
    socket_dir: Path, socket_name: str, provider: str, rpc: str
) -> None:
    agent = serve_agent(socket_dir / "var/run" / socket_name)
    try:
        found = DstackProvider.detect(socket_dir)
        assert found is not None and found.name == provider
        evidence = found.quote(REPORT_DATA)
        assert evidence.provider == provider and evidence.tee_type == "tdx"
        assert evidence.report_data == REPORT_DATA and not evidence.insecure
        assert evidence.event_log == EVENT_LOG
        ((path, body),) = agent.requests
        assert path == rpc and bytes.fromhex(body["report_data"]) == REPORT_DATA
        if provider == "dstack-tappd":
            assert body["hash_algorithm"] == "raw"
        agent.answer_report_data = bytes(64)
        with pytest.raises(ProviderError, match="not the one requested"):
            found.quote(REPORT_DATA)
    finally:
        agent.shutdown()
        agent.server_close()


def test_dstack_agent_failure_is_a_provider_error(socket_dir: Path) -> None:
    path = socket_dir / "dead.sock"
    path.touch()  # exists, but nothing listens
    with pytest.raises(ProviderError, match="quote request failed"):
        DstackProvider(path).quote(REPORT_DATA)
    with pytest.raises(ProviderUnavailable):
        DstackProvider(socket_dir / "missing.sock")


def fake_gramine(root: Path, kind: str = "dcap", report_data: bytes = REPORT_DATA) -> Path:
    root.mkdir()
    (root / "attestation_type").write_text(kind + "\n")
    (root / "user_report_data").write_bytes(bytes(64))
    (root / "quote").write_bytes(quote_for("sgx_quote", report_data, SGX_REPORT_DATA_AT))
    return root


def test_gramine_writes_report_data_and_reads_the_quote(tmp_path: Path) -> None:
    root = fake_gramine(tmp_path / "attestation")
    evidence = GramineProvider(root).quote(REPORT_DATA)
    assert (root / "user_report_data").read_bytes() == REPORT_DATA
    assert evidence.tee_type == "sgx" and evidence.provider == "gramine"
    assert evidence.quote == (root / "quote").read_bytes()


def test_gramine_refusals(tmp_path: Path) -> None:
    with pytest.raises(ProviderUnavailable, match="dcap"):
        GramineProvider(fake_gramine(tmp_path / "epid", kind="epid"))
    stale = fake_gramine(tmp_path / "stale", report_data=bytes(64))
    with pytest.raises(ProviderError, match="not the one requested"):
        GramineProvider(stale).quote(REPORT_DATA)
    with pytest.raises(ProviderError, match="64 bytes"):
        GramineProvider(fake_gramine(tmp_path / "ok")).quote(b"short")


def fake_tsm(root: Path, provider: str = "tdx_guest", outblob: bytes | None = None) -> Path:
    entry = root / "t"
    entry.mkdir(parents=True)
    blob = (
        outblob if outblob is not None else quote_for("tdx_quote", REPORT_DATA, TDX_REPORT_DATA_AT)
    )
    (entry / "outblob").write_bytes(blob)
    (entry / "provider").write_text(provider + "\n")
    (entry / "generation").write_text("3\n")
    return root


def test_tsm_tdx_and_sev(tmp_path: Path) -> None:
    root = fake_tsm(tmp_path / "tdx")
    evidence = TsmProvider(root, entry_name="t").quote(REPORT_DATA)
    assert (root / "t" / "inblob").read_bytes() == REPORT_DATA
    assert evidence.tee_type == "tdx" and evidence.provider == "tsm"
    sev = fake_tsm(tmp_path / "sev", provider="sev_guest", outblob=b"snp report")
    assert TsmProvider(sev, entry_name="t").quote(REPORT_DATA).tee_type == "sev-snp"
    odd = fake_tsm(tmp_path / "odd", provider="mystery_guest", outblob=b"x")
    with pytest.raises(ProviderError, match="unknown provider"):
        TsmProvider(odd, entry_name="t").quote(REPORT_DATA)


def test_tsm_detects_a_racing_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    provider = TsmProvider(fake_tsm(tmp_path / "tsm"), entry_name="t")
    generations = iter([3, 4])
    monkeypatch.setattr(provider, "_generation", lambda entry: next(generations))
    with pytest.raises(ProviderError, match="another writer"):
        provider.quote(REPORT_DATA)


def test_tsm_makes_and_removes_its_own_entry(tmp_path: Path) -> None:
    root = tmp_path / "report"
    root.mkdir()
    # A plain directory does not create configfs attributes: reading outblob fails cleanly.
    with pytest.raises(ProviderError, match="quote request failed"):
        TsmProvider(root).quote(REPORT_DATA)


def test_simulated_evidence_is_labelled(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        provider = SimulatedProvider()
    evidence = provider.quote(REPORT_DATA)
    assert evidence.insecure and evidence.tee_type == "simulated"
    assert evidence.quote.startswith(MAGIC) and REPORT_DATA in evidence.quote
    assert "INSECURE" in caplog.text


def empty_roots(tmp_path: Path) -> ProviderRoots:
    return ProviderRoots(tmp_path / "root", tmp_path / "no-tsm", tmp_path / "no-gramine")


def test_detect_nothing_found(tmp_path: Path) -> None:
    with pytest.raises(ProviderUnavailable, match="no TEE found"):
        select_provider(roots=empty_roots(tmp_path))
    for forced in ("dstack", "tsm", "gramine"):
        with pytest.raises(ProviderUnavailable):
            select_provider(forced, roots=empty_roots(tmp_path))
    with pytest.raises(ProviderUnavailable, match="unknown TEE"):
        select_provider("sev")


def test_detect_order_and_logging(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    roots = empty_roots(tmp_path)
    with caplog.at_level(logging.INFO):
        assert select_provider(roots=roots, allow_simulated=True).name == "simulated"
    assert "attestation provider: simulated (INSECURE" in caplog.text
    fake_gramine(roots.gramine_root)
    assert select_provider(roots=roots).name == "gramine"
    fake_tsm(roots.tsm_root)
    assert select_provider(roots=roots).name == "tsm"
    (roots.dstack_root / "var/run").mkdir(parents=True)
    (roots.dstack_root / "var/run/tappd.sock").touch()
    assert select_provider(roots=roots).name == "dstack-tappd"
    (roots.dstack_root / "var/run/dstack.sock").touch()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert select_provider(roots=roots).name == "dstack"
    assert "attestation provider: dstack" in caplog.text
    assert select_provider("gramine", roots=roots).name == "gramine"
    assert select_provider("simulated", roots=roots).name == "simulated"


def test_simulated_key_in_a_data_dir(tmp_path: Path) -> None:
    first = select_provider("simulated", data_dir=tmp_path)
    again = select_provider("simulated", data_dir=tmp_path)
    assert isinstance(first, SimulatedProvider) and isinstance(again, SimulatedProvider)
    assert first.public_key == again.public_key
    assert oct(os.stat(tmp_path / "simulated-attestation-key.pem").st_mode & 0o777) == "0o600"
