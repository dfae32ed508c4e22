#!/usr/bin/env bash
# The project's whole check: install into .venv, lint, type-check, validate compose and
# the Kubernetes manifests, test.
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# torch first and pinned: any other spec would pull the multi-GB CUDA build.
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".[test]"

echo "== ruff"
.venv/bin/ruff check .
echo "== mypy"
.venv/bin/mypy
if [ -f scripts/check_compose.sh ]; then
    echo "== docker-compose"
    bash scripts/check_compose.sh
fi
if [ -f scripts/check_k8s.sh ]; then
    echo "== kubernetes manifests"
    bash scripts/check_k8s.sh
fi
echo "== pytest"
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: treated as a failure" >&2
    exit 1
fi
exit "$rc"
