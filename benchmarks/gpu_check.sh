#!/usr/bin/env bash
# The GPU path, measured (issue 12 item 9, issue 16 item 6). On a CUDA machine:
#   1. the GPU-marked tests (pytest -m cuda: bf16 vs float32 search steps, the finite-difference
#      term against double backprop, a tiny search end to end);
#   2. benchmarks/search_step.py on CUDA (its JSON line);
#   3. one timed epoch of the CIFAR-10 search at configs/cifar10.yaml's shapes, float32 and
#      bf16 + channels-last (benchmarks/search_epoch.py: one JSON line with the projected wall
#      time of the 50-epoch search, in hours and GPU-days; goal < 0.1 GPU-day), on the 50,000
#      training images of data/cifar10_jpeg.npz in halves (data.name=cifar10-jpeg), or on real
#      CIFAR-10 when $CIFAR10_ROOT holds cifar-10-batches-py;
#   4. timed PGD-7 steps of the retraining at configs/cifar10.yaml's shape
#      (benchmarks/retrain_epoch.py: the projected hours of its 100 epochs on 50,000 images);
#   5. one line: the projected GPU-hours of the protocol (the 50-epoch search plus one
#      retraining), from 3 and 4.
#
# The data travel inside the working tree. Run it here first: it copies
# ../shared/data/cifar10_jpeg.npz (56 MB, sha256 checked) into data/ (ignored by git), and,
# without CUDA, stops there. Then run it on the accelerator machine with that file carried
# (the device tool's carry: ["data/cifar10_jpeg.npz"]; 54 MiB of the 64 MiB allowed; never carry
# data/cifar10-jpeg-cache/, the decoded cache, rebuilt there in seconds).
# Without CUDA it prints one JSON line saying why it skipped and exits 0.
# Run from the repository root: benchmarks/gpu_check.sh   (PYTHON=... to pick the interpreter)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

JPEG=data/cifar10_jpeg.npz
JPEG_SHA256=e29c226e1bae1062b7e2249a05a25a0934f569331e30dbd7bf31e7a8430f03f6

skip() {
    printf '{"benchmark": "gpu_check", "skipped": true, "reason": "%s"}\n' "$1"
    exit 0
}

# 0. the data file, inside the working tree (data/ is in .gitignore: never committed)
if [[ ! -f "$JPEG" && -f ../shared/data/cifar10_jpeg.npz ]]; then
    mkdir -p data
    cp ../shared/data/cifar10_jpeg.npz "$JPEG"
    echo "== copied ../shared/data/cifar10_jpeg.npz to $JPEG (carry it: data/cifar10_jpeg.npz)"
fi
if [[ -f "$JPEG" ]]; then
    sum=$(sha256sum "$JPEG" | cut -d' ' -f1)
    if [[ "$sum" != "$JPEG_SHA256" ]]; then
        echo "$JPEG: sha256 $sum, expected $JPEG_SHA256 (a damaged or another file)" >&2
        exit 1
    fi
fi

command -v nvidia-smi >/dev/null 2>&1 || skip "no CUDA machine: nvidia-smi not found"
"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null \
    || skip "torch.cuda.is_available() is False (or torch is missing) for $PYTHON"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

status=0
echo "== 1/5 GPU-marked tests"
"$PYTHON" -m pytest -q -m cuda -rs tests || status=1

echo "== 2/5 benchmarks/search_step.py --device cuda"
"$PYTHON" benchmarks/search_step.py --device cuda --threads 1 || status=1

echo "== 3/5 one epoch of the CIFAR-10 search"
root="${CIFAR10_ROOT:-}"
if [[ -n "$root" && -d "$root/cifar-10-batches-py" ]]; then
    data=(data.name=cifar10 "data.root=$root")
elif [[ -f "$JPEG" ]]; then
    data=(data.name=cifar10-jpeg "data.path=$JPEG" "data.sha256=$JPEG_SHA256" data.root=data)
else
    echo '{"benchmark": "search_epoch", "skipped": true, "reason": "no CIFAR-10 data: carry data/cifar10_jpeg.npz"}'
    exit 1
fi
search_json=$("$PYTHON" benchmarks/search_epoch.py --device cuda --config configs/cifar10.yaml \
    "${data[@]}") || status=1
echo "$search_json"

echo "== 4/5 PGD-7 retraining steps at the paper's shape"
retrain_json=$("$PYTHON" benchmarks/retrain_epoch.py --device cuda --config configs/cifar10.yaml) \
    || status=1
echo "$retrain_json"

echo "== 5/5 projected GPU-hours of the protocol"
SEARCH_JSON="$search_json" RETRAIN_JSON="$retrain_json" "$PYTHON" - <<'PY' || status=1
import json, os
search = json.loads(os.environ["SEARCH_JSON"].strip().splitlines()[-1])
retrain = json.loads(os.environ["RETRAIN_JSON"].strip().splitlines()[-1])
hours = {m: v["projected_protocol_h"] for m, v in search["modes"].items()}
best = min(hours.values())
print(json.dumps({
    "benchmark": "gpu_check", "gpu": search["gpu"], "data": search["data"],
    "search_epochs": search["protocol_epochs"], "search_gpu_h": hours,
    "retrain_epochs": retrain["epochs"], "retrain_gpu_h_per_network": retrain["projected_retrain_h"],
    "protocol_gpu_h": round(best + retrain["projected_retrain_h"], 2),
    "note": "one search (fastest mode) + one retraining; a study multiplies by its networks",
}))
PY
exit "$status"
