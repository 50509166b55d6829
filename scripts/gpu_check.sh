#!/usr/bin/env bash
# What no CPU can check, in one run on a machine with a CUDA GPU (CI has none):
#   1. tests/test_cuda.py: fp16 AMP + GradScaler through the engine (resume restores the scaler), every
#      stage's command line trained on CUDA and served by a process that sees no GPU, scoring on the GPU
#      equal to the CPU's fp32 (TF32 off), NCCL with two ranks (needs two GPUs; skipped with one)
#   2. bench/bench_teacher.py on CUDA: teacher forward and forward+backward, batch 2 at 128^3, fp32 / fp16 / bf16
#   3. the real teacher recipe (configs/teacher.yaml: 128^3 crops, batch 2, fp16) for 2 short epochs on
#      phantoms: seconds per epoch in its log
#   4. torchrun with one rank more than there are GPUs: must stop at once with the NCCL message, not hang
#
#   OUT=folder [PY=.venv/bin/python] scripts/gpu_check.sh      (logs: OUT/*.log, OUT/*.txt; ~5 min on one H200)
# Exit status: the number of checks that failed (0: all passed); 2 before any check when PY sees no CUDA.
set -uo pipefail
case "${1:-}" in -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
OUT=$(realpath -m "${OUT:-runs/gpu_check}")  # relative to where it is called
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "error: $PY sees no CUDA device (torch $($PY -c 'import torch; print(torch.__version__)' 2>/dev/null)):" \
         "install a CUDA build of torch (README, 'With a GPU') or point PY at one" >&2
    exit 2
fi
mkdir -p "$OUT"
WORK=$(mktemp -d)
export OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
start=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - start ))s] $*"; }
failed=0
check() { [ "$1" = 0 ] || { failed=$((failed + 1)); echo "FAILED: $2 (exit $1)"; }; }

step "machine"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPUs', torch.cuda.device_count())"
  nproc; } 2>&1 | tee "$OUT/machine.txt"

step "1/4 tests/test_cuda.py"
timeout 270 $PY -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py 2>&1 | tee "$OUT/tests.log"
check "${PIPESTATUS[0]}" "tests/test_cuda.py"

step "2/4 bench_teacher on CUDA"
timeout 100 $PY bench/bench_teacher.py --device cuda --sizes 128 --runs 5 --batch 2 --modes fp32 fp16 bf16 2>&1 \
    | tee "$OUT/bench_teacher.txt"
check "${PIPESTATUS[0]}" "bench_teacher"

step "3/4 the teacher recipe, 2 epochs of 10 steps (128^3 crops, batch 2, train.amp=auto)"
$PY -m brats.phantom "$WORK/data" --cases 6 --val-cases 0 --shape 160 160 128 --seed 0 >/dev/null
timeout 120 $PY train.py --config configs/teacher.yaml --data "$WORK/data" --out "$WORK/teacher" \
    --set train.epochs=2 --set train.steps_per_epoch=10 --set train.val_every=1 --set train.warmup_epochs=1 \
    --set data.val_fraction=0.34 --set train.log_images=false 2>&1 | tr '\r' '\n' | tee "$OUT/train.log"
check "${PIPESTATUS[0]}" "train.py"
$PY - "$WORK/teacher" <<'EOF' 2>&1 | tee -a "$OUT/train.log"
import sys, torch
from common.artifact import Artifact
last = Artifact.load(f"{sys.argv[1]}/last.pt")
for h in last.extra["train_state"]["history"]:
    val = f"{h['val']['dice_mean']:.3f}" if h["val"] else "-"
    print(f"epoch {h['epoch']}: {h['seconds']} s (10 steps + validation), val dice_mean {val}")
print("runtime", last.extra["runtime"])
EOF

gpus=$(nvidia-smi -L | wc -l)
step "4/4 torchrun, $((gpus + 1)) ranks on $gpus GPU(s)"
timeout 45 $PY -m torch.distributed.run --standalone --nproc_per_node=$((gpus + 1)) train.py \
    --config configs/teacher.yaml --data "$WORK/data" --out "$WORK/ddp" --set train.epochs=1 \
    --set train.steps_per_epoch=2 > "$OUT/torchrun.log" 2>&1
grep -q "NCCL needs one per rank" "$OUT/torchrun.log" && ! grep -q "^teacher epoch" "$OUT/torchrun.log"
check $? "torchrun refusal (the NCCL message, before any training)"
grep "^error:" "$OUT/torchrun.log"

step "done: $failed check(s) failed"
rm -rf "$WORK"
exit "$failed"
