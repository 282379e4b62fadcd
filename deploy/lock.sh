#!/usr/bin/env bash
# Regenerate the image lock files: every Python package the images install, pinned
# to one version with the SHA-256 of every file the registries publish for it, so
# `pip install --require-hashes` installs exactly these bytes or fails.
#
#   deploy/lock.sh                      # needs uv (in the dev extra) and the registries
#   TORCH_CPU_SOURCE=/opt/wheels deploy/lock.sh   # a directory holding the CPU wheel
#
# The CPU torch build lives on the PyTorch CPU index (TORCH_CPU_SOURCE, default that
# index); a directory given instead must hold that very wheel file. Run it after any
# change to pyproject.toml's dependencies or to deploy/requirements-*.in; the test
# tests/attest/test_deploy_files.py fails while a dependency is missing from a lock.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-uv}
TORCH_CPU_SOURCE=${TORCH_CPU_SOURCE:-https://download.pytorch.org/whl/cpu}
common=(
    --generate-hashes --only-binary :all: --python-version 3.11
    --python-platform x86_64-manylinux_2_28 --index-url https://pypi.org/simple
    --custom-compile-command "deploy/lock.sh" --quiet
)
if [ -d "$TORCH_CPU_SOURCE" ]; then
    cpu_source=(--find-links "$TORCH_CPU_SOURCE")
else
    cpu_source=(--extra-index-url "$TORCH_CPU_SOURCE" --index-strategy unsafe-best-match)
fi
"$UV" pip compile "${common[@]}" "${cpu_source[@]}" \
    pyproject.toml deploy/requirements-cpu.in -o deploy/requirements-cpu.lock
"$UV" pip compile "${common[@]}" \
    pyproject.toml deploy/requirements-cuda.in -o deploy/requirements-cuda.lock
echo "lock.sh: wrote deploy/requirements-cpu.lock and deploy/requirements-cuda.lock"
