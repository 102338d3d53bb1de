#!/usr/bin/env bash
# int8 rows of the README: float students, PTQ with each calibration source, QAT-by-distillation, for both MNIST
# demo teachers. One run at a time, one torch thread. Usage: bench/int8.sh [OUT_DIR]   (default runs/int8)
set -euo pipefail
OUT=${1:-runs/int8}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1
EVAL=examples/mnist_test.npz
dfkd() { python -m dfkd "$@"; }

# teacher  method  steps  data-free calibration methods (each with its -p flags)
rows=("lenet5 examples/mnist_lenet5.pt dfad 1500" "lenet5_bn examples/mnist_lenet5_bn.pt fast 1500")
for row in "${rows[@]}"; do
  read -r name teacher method steps <<<"$row"
  float="$OUT/float-$name"
  [ -f "$float/student.pt" ] || dfkd distill --teacher "$teacher" --method "$method" --steps "$steps" \
      --eval-data "$EVAL" --fid-every 0 --out "$float" >"$float.log" 2>&1
  # TAG:--calibration and its flags. Real test images: the upper reference only (test data, never used to
  # train); noise: the lower reference.
  if [ "$name" = lenet5 ]; then calib=("zskd:zskd -p s_steps=0" "dfad:dfad --synth-steps 500"); else
    calib=("zeroq:zeroq -p s_steps=0" "zeroq-oh:zeroq -p s_steps=0 -p oh=1" \
           "deepinversion:deepinversion -p s_steps=0"); fi
  for c in "${calib[@]}" "mnist_test:$EVAL" "noise:noise"; do
    tag=${c%%:*}
    # shellcheck disable=SC2086
    dfkd quantize "$float/student.pt" --teacher "$teacher" --calibration ${c#*:} --eval-data "$EVAL" --force \
        --out "$OUT/ptq-$name-$tag.onnx" >"$OUT/ptq-$name-$tag.log" 2>&1
  done
  qat="$OUT/qat-$name"
  [ -f "$qat/student_int8.onnx" ] || dfkd distill --teacher "$teacher" --method "$method" --steps "$steps" \
      --eval-data "$EVAL" --fid-every 0 --quantize int8 --out "$qat" >"$qat.log" 2>&1
done
for f in "$OUT"/ptq-*.log; do echo "== $f"; grep -E "size|latency|top-1|agreement|calibration" "$f"; done
for f in "$OUT"/qat-*/deploy.json; do echo "== $f"; cat "$f"; done
