#!/usr/bin/env bash
# The GPU checks, in one command, on a machine with one NVIDIA GPU (CI has none, so none of this runs there):
#   1. tests marked gpu: the optimizer core under CUDA with torch.cuda.set_sync_debug_mode("error") around steps
#      (no host sync per step, the cadence checks included), CPU/GPU parity, bf16 autocast with fp32 adapters,
#      fp16 with GradScaler (an overflow step neither shrinks nor counts), a model on a second GPU when there is one;
#   2. the optimizer-step overhead on CUDA (default and fused AdamW), Qwen2.5-0.5B shapes;
#   3. the end-to-end training overhead on Qwen2.5-Coder-0.5B-Instruct, bf16 autocast;
#   4. one short `stablelora train` of the GPU math config through to a saved adapter and its evaluation.
# Each part's output is kept in $RESULTS (default benchmarks/results/gpu/), headed by the command that made it.
#
#   PYTHON=python3 bash scripts/gpu_check.sh      # an environment whose torch has CUDA, with stablelora's deps
set -uo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
results="${RESULTS:-benchmarks/results/gpu}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: $python has no CUDA device (torch.cuda.is_available() is False). Run it on a GPU machine with" \
         "a CUDA build of torch, e.g. PYTHON=/path/to/python bash scripts/gpu_check.sh" >&2
    exit 2
fi
mkdir -p "$results"
"$python" -c 'import torch; print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}")' \
    | tee "$results/device.txt"
failed=0
part() {  # part NAME COMMAND...: run one check, keep its output under its command, go on if it fails
    local name="$1"; shift
    echo "== $name: $*"
    { echo "Command: \`$*\`"; echo; "$@" 2>&1; echo "exit: $?"; } | tee "$results/$name.log"
    tail -1 "$results/$name.log" | grep -q "exit: 0" || failed=1
}
part tests "$python" -m pytest -m gpu tests/test_gpu.py -v
part optimizer_overhead "$python" benchmarks/optimizer_overhead.py --device cuda --rounds 300 --steps 5 \
    --out "$results/optimizer_overhead.md"
part train_overhead "$python" benchmarks/train_overhead.py --model qwen2.5-coder-0.5b-instruct --device cuda --bf16 \
    --batch-size 16 --steps 60 --out "$results/train_overhead.md"
run_dir="$(mktemp -d)/gpu_math"
part train "$python" -m stablelora.cli train configs/gpu_qwen05_gsm_symbolic.yaml training.max_steps=30 \
    training.num_train_epochs=1 training.save_strategy=no data.eval_size=32 data.max_new_tokens=128 \
    --output-dir "$run_dir"
[ -f "$run_dir/adapter/adapter_model.safetensors" ] && [ -f "$run_dir/metrics.json" ] \
    && cp "$run_dir/metrics.json" "$results/train_metrics.json" || failed=1
echo "gpu_check: $([ $failed = 0 ] && echo all parts passed || echo 'some part FAILED, see the logs') in $results"
exit $failed
