#!/usr/bin/env bash
# Create .venv and install teeshard with everything its tests need. Idempotent:
# re-running only installs what changed. Works offline except for the package
# registries (PyPI, Debian, npm).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
STAMP="$VENV/.teeshard-setup"
FINGERPRINT="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16) $TORCH_SPEC"

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$FINGERPRINT" ]; then
    echo "setup: installing $TORCH_SPEC and teeshard[dev,postgres,evm] into $VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
    "$VENV/bin/python" -m pip install --quiet -e ".[dev,postgres,evm]"
    echo "$FINGERPRINT" > "$STAMP"
fi

# The web console (web/, TypeScript) ships built inside the package
# (src/teeshard/entry/static/), so installing teeshard needs no Node. Rebuild it
# only when its sources changed (the digest recorded beside the bundle differs);
# tests/entry/test_console_static.py fails when a committed build is stale.
console_digest() {
    "$VENV/bin/python" -c 'import sys; from pathlib import Path; from teeshard.entry.console_static import sources_digest; print(sources_digest(Path(sys.argv[1])))' web
}
built="$("$VENV/bin/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["sources_sha256"])' src/teeshard/entry/static/console.build.json 2>/dev/null || true)"
if [ "$(console_digest)" != "$built" ]; then
    if command -v npm >/dev/null; then
        echo "setup: web/ changed: rebuilding the console (npm ci, esbuild)"
        npm ci --prefix web --no-audit --no-fund --silent
        npm run --prefix web --silent build
    else
        echo "setup: web/ changed but npm is not installed: the committed console build is stale"
    fi
fi
