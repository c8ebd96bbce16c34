#!/usr/bin/env bash
# Does stablelora join a user's stack instead of replacing it? Builds the wheel, makes a fresh venv that already
# holds the user's stack, installs the wheel there, fails if that install changed any package the venv held, and
# runs the tests against the installed wheel:
#   scripts/check_wheel.sh newest     # the newest torch and peft PyPI serves: core tests (pytest -m core)
#   scripts/check_wheel.sh floors     # the floors pyproject.toml declares for torch and peft: core tests
#   scripts/check_wheel.sh ms-swift   # ms-swift 4.6.0 with the stack it resolves: core tests + its plug-in test
#   scripts/check_wheel.sh axolotl    # axolotl 0.21.0 (Python >= 3.12: set PYTHON) likewise
#   scripts/check_wheel.sh llamafactory  # LLaMA-Factory 0.9.5 (its v1 trainer) likewise
# A framework's stack includes deepspeed (the lock's release): its plug-in test also trains through that framework's
# own DeepSpeed option and checks a refusal. DeepSpeed's JIT-built comm op is kept in $TORCH_EXTENSIONS_DIR
# (default: beside the venv), so a rerun does not build it again.
# The log goes to benchmarks/results/wheel_check/<mode>.log; benchmarks/results/wheel_check.md keeps the results.
set -euo pipefail
cd "$(dirname "$0")/.."
# Everything runs inside main, which bash reads whole before it starts: an edit to this file while a check runs
# (each takes minutes) cannot change what that check does.
main() {
mode="${1:-}"
python="${PYTHON:-python3}"
integration=""
case "$mode" in
  newest)
    # This machine caps pip at the torch it keeps on disk (/etc/xdg/pip); a user's machine has no such cap.
    export PIP_CONSTRAINT=/dev/null
    stack=(torch peft) ;;
  floors)
    mapfile -t stack < <("$python" - <<'EOF'
import re, tomllib
for dep in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    name, floor = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)\s*", dep).groups()
    print(f"{name}=={floor}")
EOF
    ) ;;
  ms-swift)
    stack=(torch==2.13.0 ms-swift==4.6.0)  # the CPU torch on this machine's disk first, as the set-up does
    integration=ms_swift ;;
  axolotl)
    stack=(axolotl==0.21.0)
    integration=axolotl ;;
  llamafactory)
    # LLaMA-Factory imports torchvision and torchaudio, whose PyPI builds need the torch they were built for
    stack=(torch==2.9.1 torchvision==0.24.1 "torchaudio==2.9.*" llamafactory==0.9.5)
    integration=llamafactory ;;
  *) echo "usage: [PYTHON=python3.x] scripts/check_wheel.sh newest|floors|ms-swift|axolotl|llamafactory" >&2; exit 2 ;;
esac
work="${CHECK_WHEEL_DIR:-/tmp/stablelora_wheel_check}/$mode"
log="benchmarks/results/wheel_check/$mode.log"
rm -rf "$work" && mkdir -p "$work" "$(dirname "$log")"
exec > >(tee "$log") 2>&1
echo "# scripts/check_wheel.sh $mode   ($(date -u +%F), $(uname -m), $("$python" --version))"
"$python" -m venv "$work/venv"
pip=("$work/venv/bin/python" -m pip --disable-pip-version-check)

if [ -n "$integration" ]; then  # DeepSpeed users' stack: the release the lock holds
  stack+=("$(grep -E '^deepspeed==' constraints.txt)")
fi
echo "## the user's stack: ${stack[*]}"
"${pip[@]}" install --quiet "${stack[@]}" pytest pytest-timeout
"${pip[@]}" freeze > "$work/before.txt"

echo "## build and install the wheel"
"${pip[@]}" wheel --quiet --no-deps --wheel-dir "$work/dist" .
"${pip[@]}" install --quiet "$work"/dist/stablelora-*.whl
"${pip[@]}" freeze | grep -v '^stablelora' > "$work/after.txt"
if ! diff "$work/before.txt" "$work/after.txt"; then
  echo "FAIL: installing the wheel changed the packages above" >&2; exit 1
fi
echo "installing the wheel kept every package; it added only stablelora"
"$work/venv/bin/python" - <<'EOF'
from importlib.metadata import PackageNotFoundError, version
import stablelora
def installed(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None
names = ["torch", "peft", "transformers", "accelerate", "trl", "deepspeed", "ms-swift", "axolotl", "llamafactory"]
print(", ".join(f"{name} {installed(name)}" for name in names if installed(name)))
print(f"stablelora {stablelora.__version__} from {stablelora.__file__}")
assert "site-packages" in stablelora.__file__, "the tests must run against the installed wheel, not src/"
EOF

# the pytest entry point (not python -m pytest) keeps the checkout off sys.path, so the wheel is what is tested
echo "## core tests"
"$work/venv/bin/pytest" -m core -q -p no:cacheprovider tests
if [ -n "$integration" ]; then
  export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${CHECK_WHEEL_DIR:-/tmp/stablelora_wheel_check}/torch_extensions_$mode}"
  echo "## $mode plug-in test"
  "$work/venv/bin/pytest" -m integration -k "$integration" -q -p no:cacheprovider tests/test_integrations.py
fi
}
main "$@"
exit
