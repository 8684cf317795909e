#!/usr/bin/env bash
# Early warning: build a second environment (.venv-newest) with the newest release of every dependency
# (torch stays at 2.13.0, the CPU build: a newer torch from the registry is a multi-GB CUDA build) and
# run the fast suite there, with deprecation warnings from our code and transformers' as errors.
# Green: constraints.txt may be refreshed from it (see CONTRIBUTING.md). Red: the failures name what will
# break us on the next release, while main still installs the known-good set.
set -euo pipefail
cd "$(dirname "$0")/.."
AGENTSPEC_VENV=.venv-newest AGENTSPEC_CONSTRAINTS="" bash scripts/setup.sh
.venv-newest/bin/python -m pip list --format=freeze 2>/dev/null | grep -v '^agentspec' \
    | sed 's/+cpu$//' > .venv-newest/versions.txt
echo "versions that differ from constraints.txt (< pinned, > newest):"
pinned=$(grep -v '^#' constraints.txt | grep -viE '^(pip|setuptools|wheel|pybind11)==' | sort -f)
newest=$(grep -viE '^(pip|setuptools|wheel|pybind11)==' .venv-newest/versions.txt | sort -f)
{ diff <(echo "$pinned") <(echo "$newest") || true; } | grep '^[<>]' || echo "  (none)"
.venv-newest/bin/python -m pytest -q -m "not model" -p no:cacheprovider "$@"
