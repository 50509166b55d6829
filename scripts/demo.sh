#!/usr/bin/env bash
# The whole pipeline on built-in synthetic BraTS-like cases, at demo scale (configs/demo/*.yaml).
# Every stage reads the previous stage's artifact and writes its own under runs/demo/; a second run
# replaces the first (--overwrite).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs/demo}
DATA=${DATA:-data/demo}  # its own folder: train.py's built-in synthetic cases (data/synthetic) have other settings
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
start=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - start ))s] $*"; }

step "1/9 synthetic BraTS 2017 cases -> $DATA"
$PY -m brats.phantom "$DATA" --cases 20 --val-cases 2 --shape 96 96 64 --seed 0

step "2/9 teacher (train.py)"
$PY train.py --config configs/demo/teacher.yaml --data "$DATA" --out "$RUNS/teacher" --overwrite

step "3/9 self-distilled width-0.25 student (distill.py)"
$PY distill.py --config configs/demo/distill.yaml --data "$DATA" --teacher "$RUNS/teacher/best.pt" --width 0.25 --out "$RUNS/student" --overwrite

step "4/9 latency-aware slimming: head at 1/2 resolution, patchifying stem, narrower decoder (compress.slim)"
$PY -m compress.slim "$RUNS/student/student.pt" --config configs/demo/slim.yaml --data "$DATA" --out "$RUNS/slim" --overwrite

step "5/9 low-rank factorisation (compress.lowrank)"
$PY -m compress.lowrank "$RUNS/slim/slim.pt" --config configs/demo/lowrank.yaml --data "$DATA" --out "$RUNS/lowrank" --overwrite

step "6/9 progressive channel growth (compress.grow)"
$PY -m compress.grow "$RUNS/lowrank/lowrank.pt" --config configs/demo/grow.yaml --data "$DATA" --out "$RUNS/grow" --overwrite

step "7/9 INT8 quantisation (quantize.py)"
$PY quantize.py "$RUNS/grow/grown.pt" --config configs/demo/quantize.yaml --data "$DATA" --out "$RUNS/int8" --overwrite

step "8/9 predict the validation release, and the held-out training cases to score them"
$PY predict.py "$RUNS/int8/int8.pt" --input "$DATA/Brats17ValidationData" --output "$RUNS/predictions/validation" --overwrite
$PY predict.py "$RUNS/int8/int8.pt" --input "$DATA/Brats17TrainingData" --split "$DATA/.cache/splits.json" \
    --output "$RUNS/predictions/held-out" --overwrite
$PY -m brats.evaluate "$RUNS/predictions/held-out" "$DATA/Brats17TrainingData" --subset --out "$RUNS/predictions/held-out/scores.csv" --overwrite

step "9/9 report"
$PY report.py "$RUNS" --data "$DATA" --config configs/demo/report.yaml --out report/demo
echo
echo "demo finished in $(( $(date +%s) - start ))s; report: report/demo/report.md"
