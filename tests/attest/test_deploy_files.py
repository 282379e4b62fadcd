"""Deployment files: pinned by content, placeholders that fail loudly, commands the CLI takes.

Docker and Phala are not here, so the files are checked as text with the rules
their tools apply: compose's ``${VAR:?message}`` interpolation (rendered below the
way ``docker compose config`` does: an unset variable is an error), Dockerfile
``FROM`` references, pip's hash-checking requirement files. Every ``teeshard ...``
command line in them is parsed by the real argument parser of the CLI, so they
cannot drift from it.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from teeshard.attest.verify.policy import Policy
from teeshard.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_FILES = sorted(DEPLOY.glob("docker-compose.*.yml"))
DOCKERFILES = sorted(DEPLOY.glob("Dockerfile*"))
LOCKS = {"Dockerfile": "requirements-cpu.lock", "Dockerfile.cuda": "requirements-cuda.lock"}
DIGEST = "sha256:" + "ab" * 32
VALUES = {  # what a deployer fills in, well-formed
    "TEESHARD_IMAGE": "ghcr.io/example/teeshard",
    "TEESHARD_IMAGE_DIGEST": DIGEST,
    "NODE2_APP_ID": "0123abcd",
    "NODE2_GATEWAY_DOMAIN": "dstack-prod.example",
    "NODE2_MRTD": "11" * 48,
    "NODE2_RTMR0": "22" * 48,
    "NODE2_RTMR1": "33" * 48,
    "NODE2_RTMR2": "44" * 48,
    "NODE2_COMPOSE_HASH": "55" * 32,
    "NODE2_MANIFEST_HASH": "66" * 32,
    "NODE1_MRTD": "77" * 48,
    "NODE1_RTMR0": "88" * 48,
    "NODE1_RTMR1": "99" * 48,
    "NODE1_RTMR2": "aa" * 48,
    "NODE1_MANIFEST_HASH": "bb" * 32,
    "MODEL_REVISION": "fe8a4ea1ffedaf415f4da2f062534de366a451e6",
}
_VAR = re.compile(r"\$\{([^}]*)\}")
_REQUIRED = re.compile(r"([A-Z][A-Z0-9_]*):\?(.+)")


class Unset(Exception):
    pass


def render(value: Any, env: Mapping[str, str]) -> Any:
    """Compose interpolation, as strict as the files use it: ``${NAME:?message}`` only."""
    if isinstance(value, dict):
        return {k: render(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [render(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        required = _REQUIRED.fullmatch(match.group(1))
        assert required, f"${{{match.group(1)}}}: only ${{NAME:?message}} may be used"
        name, message = required.groups()
        if not env.get(name):
            raise Unset(f"{name}: {message}")
        return env[name]

    return _VAR.sub(one, value)


def compose(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)
    elif isinstance(value, str):
        yield value


def test_there_are_compose_files_and_dockerfiles() -> None:
    assert {p.name for p in COMPOSE_FILES} >= {
        "docker-compose.node1.yml",
        "docker-compose.node2.yml",
    }
    assert {p.name for p in DOCKERFILES} >= {"Dockerfile", "Dockerfile.cuda"}


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_every_placeholder_fails_loudly_until_filled(path: Path) -> None:
    raw = compose(path)
    placeholders = {m.group(1) for s in strings(raw) for m in _VAR.finditer(s)}
    assert placeholders, "the image digest at least must be a placeholder or a literal digest"
    names = set()
    for placeholder in placeholders:
        required = _REQUIRED.fullmatch(placeholder)
        assert required, f"{path.name}: ${{{placeholder}}} would silently become empty"
        names.add(required.group(1))
    assert "TEESHARD_IMAGE_DIGEST" in names
    # Unfilled, rendering fails naming the variable; each one alone is enough to fail.
    for name in names:
        with pytest.raises(Unset, match=name):
            render(raw, {k: v for k, v in VALUES.items() if k != name})
    rendered = render(raw, VALUES)
    # No bare placeholder text (the old NODE2_MRTD style) survives the rendering.
    leftovers = [s for s in strings(rendered) if re.search(r"\bNODE[12]_[A-Z_]+\b|\bOWNER\b", s)]
    assert leftovers == []


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_rendered_images_are_pinned_by_digest(path: Path) -> None:
    rendered = render(compose(path), VALUES)
    for name, service in rendered["services"].items():
        image = service["image"]
        assert re.fullmatch(r"[a-z0-9./_-]+@sha256:[0-9a-f]{64}", image), f"{name}: {image}"


def node_commands(path: Path) -> list[list[str]]:
    rendered = render(compose(path), VALUES)
    return [
        service["command"]
        for service in rendered["services"].values()
        if service.get("command") and service["command"][0] == "node"
    ]


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_commands_parse_with_the_real_cli(path: Path) -> None:
    (command,) = node_commands(path)
    args = build_parser().parse_args(command)  # SystemExit (a failure) on any drift
    assert args.command == "node" and args.tee == "dstack"
    assert str(args.policy) == "/etc/teeshard/policy.toml"
    # a node that cannot fetch collateral can never verify its next node's TDX quote
    assert args.collateral is not None or args.pccs_url
    node = compose(path)["services"]["teeshard"]
    assert "/var/run/dstack.sock:/var/run/dstack.sock" in node["volumes"]
    assert any(v.startswith("models:/models") for v in node["volumes"])
    assert "/health" in " ".join(node["healthcheck"]["test"])
    if path.name.endswith("node1.yml"):
        assert args.entry and args.next_url.startswith("wss://0123abcd-8000s.")
        assert str(args.layers) == "0:11"


def test_the_node_has_the_same_default_collateral_source_as_the_cli() -> None:
    parser = build_parser()
    node = parser.parse_args(["node", "--model", "m", "--layers", "0:1"])
    verify = parser.parse_args(["verify", "https://node:8000"])
    assert node.pccs_url and node.pccs_url == verify.pccs_url


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_inline_policies_load_and_constrain_rtmr3(path: Path) -> None:
    content = render(compose(path), VALUES)["configs"]["policy"]["content"]
    policy = Policy.from_mapping(tomllib.loads(content), path.name)
    assert policy.allowed_tcb_statuses == {"UpToDate"} and not policy.allow_simulated
    assert policy.lists_tdx and policy.manifests
    if path.name.endswith("node1.yml"):  # the downstream direction pins node 2's app
        assert policy.compose_hashes == {bytes.fromhex(VALUES["NODE2_COMPOSE_HASH"])}
    else:  # node 2 admits node 1 by platform and entry manifest (docs/deploy.md says why)
        assert policy.allow_any_rtmr3 and not policy.compose_hashes
        assert policy.manifests[0].manifest_hash == bytes.fromhex(VALUES["NODE1_MANIFEST_HASH"])


def test_gramine_template() -> None:
    text = (DEPLOY / "gramine" / "teeshard-node.manifest.template").read_text()
    assert 'sgx.remote_attestation = "dcap"' in text
    assert "sgx.debug = false" in text
    assert '"file:{{ model_dir }}/"' in text.split("sgx.trusted_files")[1]
    assert "loader.entrypoint.uri" in text and "sgx.enclave_size" in text
    argv_text = text.split("loader.argv = ")[1].split("]\n")[0] + "]"
    argv = tomllib.loads("argv = " + argv_text.replace("{{ layers }}", "0:11"))["argv"]
    assert argv[1:3] == ["-m", "teeshard.cli"]
    args = build_parser().parse_args(argv[3:])
    assert args.command == "node" and args.tee == "gramine" and args.pccs_url


# -- images ----------------------------------------------------------------------------


def from_lines(text: str) -> list[str]:
    return re.findall(r"^\s*FROM\s+(?:--platform=\S+\s+)?(\S+)", text, re.MULTILINE | re.IGNORECASE)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_bases_are_pinned_by_digest(path: Path) -> None:
    bases = from_lines(path.read_text())
    assert bases
    for base in bases:
        assert re.fullmatch(r"[a-z0-9./_-]+(:[\w.-]+)?@sha256:[0-9a-f]{64}", base), base


@pytest.mark.parametrize(
    ("text", "pinned"),
    [
        ("FROM python:3.11.13-slim-bookworm\n", False),
        ("FROM python:latest\n", False),
        ("FROM --platform=linux/amd64 python:3.11@sha256:" + "0" * 64 + "\n", True),
        ("from ubuntu@sha256:" + "a" * 64 + " AS base\nFROM base\n", False),
    ],
)
def test_the_digest_rule_itself(text: str, pinned: bool) -> None:
    """The check above must be able to fail: a tag, :latest, a second unpinned stage."""
    ok = all(
        re.fullmatch(r"[a-z0-9./_-]+(:[\w.-]+)?@sha256:[0-9a-f]{64}", b) for b in from_lines(text)
    )
    assert ok is pinned


def lock_entries(path: Path) -> dict[str, tuple[str, list[str]]]:
    """``name -> (version, hashes)`` of a pip hash-checking requirements file."""
    text = re.sub(r"\\\n", " ", path.read_text())
    entries: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})+)", line)
        assert match, f"{path.name}: not an exact pin with hashes: {line[:80]}"
        name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
        entries[name] = (match.group(2), re.findall(r"[0-9a-f]{64}", match.group(3)))
    return entries


def project_dependencies() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0] for d in project["dependencies"]]
    return [re.sub(r"[-_.]+", "-", n).lower() for n in names]


@pytest.mark.parametrize(("dockerfile", "lock"), sorted(LOCKS.items()))
def test_images_install_from_a_lock_with_hashes(dockerfile: str, lock: str) -> None:
    text = (DEPLOY / dockerfile).read_text()
    assert f"COPY deploy/{lock} " in text
    install = text.split("--require-hashes", 1)
    assert len(install) == 2 and "--no-deps" in install[1].split("\n\n")[0]
    # the project itself: no resolution, no build isolation (which would fetch setuptools)
    assert "pip install --no-deps --no-build-isolation --no-index ." in text
    entries = lock_entries(DEPLOY / lock)
    missing = [d for d in project_dependencies() if d not in entries]
    assert missing == [], f"{lock} lacks {missing}: run deploy/lock.sh"
    assert {"setuptools", "wheel"} <= entries.keys()
    assert all(hashes for _, hashes in entries.values())
    torch = entries["torch"][0]
    assert torch.endswith("+cpu") == (dockerfile == "Dockerfile")
    if dockerfile == "Dockerfile":
        assert "download.pytorch.org/whl/cpu" in text
    else:  # the CUDA runtime is a pinned wheel too
        assert "nvidia-cuda-runtime" in entries


def test_the_example_policy_loads_once_filled_in() -> None:
    text = (DEPLOY / "policy.example.toml").read_text()
    text = re.sub(r"<96 hex chars[^>]*>", "00" * 48, text)
    text = re.sub(r"<64 hex chars[^>]*>", "00" * 32, text)
    policy = Policy.from_mapping(tomllib.loads(text), "policy.example.toml")
    assert policy.constrains_rtmr3 and not policy.allow_simulated and not policy.allow_any_rtmr3
