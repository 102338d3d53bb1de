#!/usr/bin/env bash
# int8 rows of the README: float students, PTQ with each calibration source, QAT-by-distillation, for both MNIST
# demo teachers and the CIFAR-10 teacher. One run at a time, one torch thread.
# Usage: bench/int8.sh [OUT_DIR] [CIFAR_TEST]   (defaults runs/int8, ../shared/data/cifar10_test_jpeg.npz; the
# CIFAR-10 rows are skipped when that file is missing)
set -euo pipefail
OUT=${1:-runs/int8}
CIFAR_TEST=${2:-../shared/data/cifar10_test_jpeg.npz}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1
dfkd() { python -m dfkd "$@"; }

# name  teacher  eval-data  method  budget flags  calibration images
rows=("lenet5 examples/mnist_lenet5.pt examples/mnist_test.npz dfad --steps=1500 512"
      "lenet5_bn examples/mnist_lenet5_bn.pt examples/mnist_test.npz fast --steps=1500 512")
[ -f "$CIFAR_TEST" ] && rows+=("cifar10 examples/cifar10_wrn16_1.pt $CIFAR_TEST dfq --budget-minutes=10 256")
for row in "${rows[@]}"; do
  read -r name teacher eval method budget ncal <<<"$row"
  student=(); [ "$name" = cifar10 ] && student=(--student wrn_16_1)
  float="$OUT/float-$name"
  [ -f "$float/student.pt" ] || dfkd distill --teacher "$teacher" --method "$method" "$budget" "${student[@]}" \
      --eval-data "$eval" --fid-every 0 --out "$float" >"$float.log" 2>&1
  # TAG:--calibration and its flags. Real test images: the upper reference only (test data, never used to
  # train); noise: the lower reference.
  case $name in
    lenet5) calib=("zskd:zskd -p s_steps=0" "dfad:dfad --synth-steps 500") ;;
    lenet5_bn) calib=("zeroq:zeroq -p s_steps=0" "zeroq-oh:zeroq -p s_steps=0 -p oh=1" \
                      "deepinversion:deepinversion -p s_steps=0") ;;
    # CIFAR inversion cut for a loaded CPU: one batch of 64 images, 100 iterations (recipes: zeroq 500,
    # deepinversion 2000; ZeroQ itself calibrates on one batch of 32).
    cifar10) inv="-p s_steps=0 -p iterations=100 -p synth_batch_size=64 --num-calibration 64"
             calib=("zeroq:zeroq $inv" "deepinversion:deepinversion $inv" "dfq:dfq --synth-steps 200") ;;
  esac
  for c in "${calib[@]}" "test:$eval" "noise:noise"; do
    tag=${c%%:*}
    [ -f "$OUT/ptq-$name-$tag.onnx" ] && continue
    # shellcheck disable=SC2086
    dfkd quantize "$float/student.pt" --teacher "$teacher" --eval-data "$eval" --num-calibration "$ncal" \
        --calibration ${c#*:} --out "$OUT/ptq-$name-$tag.onnx" >"$OUT/ptq-$name-$tag.log" 2>&1
  done
  qat="$OUT/qat-$name"
  [ -f "$qat/student_int8.onnx" ] || dfkd distill --teacher "$teacher" --method "$method" "$budget" \
      "${student[@]}" --eval-data "$eval" --fid-every 0 --quantize int8 --out "$qat" >"$qat.log" 2>&1
done
for f in "$OUT"/ptq-*.log; do echo "== $f"; grep -E "size|latency|top-1|agreement|calibration:" "$f"; done
for f in "$OUT"/qat-*/deploy.json; do echo "== $f"; cat "$f"; done
