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
