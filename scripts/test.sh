#!/usr/bin/env bash
# Every check CI runs: lint, format, types, tests. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"; ruff check src tests benchmarks; ruff format --check src tests benchmarks
echo "== mypy"; mypy
if [ -x web/node_modules/.bin/tsc ]; then echo "== tsc (web console)"; web/node_modules/.bin/tsc --noEmit -p web; fi
echo "== pytest"; pytest "$@"
