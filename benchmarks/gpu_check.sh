#!/usr/bin/env bash
# The GPU path, measured (issue 12 item 9). On a CUDA machine:
#   1. the GPU-marked tests (pytest -m cuda: bf16 vs float32 search steps, the finite-difference
#      term against double backprop, a tiny search end to end);
#   2. benchmarks/search_step.py on CUDA (its JSON line);
#   3. one timed epoch of the CIFAR-10 search at configs/cifar10.yaml's shapes, float32 and
#      bf16 + channels-last (benchmarks/search_epoch.py: one JSON line with the projected wall
#      time of the 50-epoch protocol, in hours and GPU-days; goal < 0.1 GPU-day). Real CIFAR-10
#      when $CIFAR10_ROOT (or data/) holds cifar-10-batches-py, else the shared 10,000-image
#      subset at 32x32 (data.name=cifar10-npz), extrapolated per step to the full epoch.
# Without CUDA it prints one JSON line saying why it skipped and exits 0.
# Run from the repository root: benchmarks/gpu_check.sh   (PYTHON=... to pick the interpreter)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

skip() {
    printf '{"benchmark": "gpu_check", "skipped": true, "reason": "%s"}\n' "$1"
    exit 0
}

command -v nvidia-smi >/dev/null 2>&1 || skip "no CUDA machine: nvidia-smi not found"
"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null \
    || skip "torch.cuda.is_available() is False (or torch is missing) for $PYTHON"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

status=0
echo "== 1/3 GPU-marked tests"
"$PYTHON" -m pytest -q -m cuda -rs tests || status=1

echo "== 2/3 benchmarks/search_step.py --device cuda"
"$PYTHON" benchmarks/search_step.py --device cuda --threads 1 || status=1

echo "== 3/3 one epoch of the CIFAR-10 search"
root="${CIFAR10_ROOT:-data}"
npz=""
for candidate in "${CIFAR10_NPZ:-}" shared/data/cifar10_subset.npz ../shared/data/cifar10_subset.npz; do
    if [[ -n "$candidate" && -f "$candidate" ]]; then npz="$candidate"; break; fi
done
if [[ -d "$root/cifar-10-batches-py" ]]; then
    data=(data.name=cifar10 "data.root=$root")
elif [[ -n "$npz" ]]; then
    data=(data.name=cifar10-npz "data.path=$npz" data.image_size=0)
else
    echo '{"benchmark": "search_epoch", "skipped": true, "reason": "no CIFAR-10 data found"}'
    exit 1
fi
"$PYTHON" benchmarks/search_epoch.py --device cuda --config configs/cifar10.yaml "${data[@]}" \
    || status=1
exit "$status"
