#!/usr/bin/env bash
# int8 rows of the README: float students, PTQ with each calibration source, QAT-by-distillation, for both MNIST
# demo teachers and the CIFAR-10 teacher. One run at a time, one torch thread.
# Usage: bench/int8.sh [OUT_DIR] [CIFAR_TEST] [MNIST_TRAIN]   (defaults runs/int8,
# ../shared/data/cifar10_test_jpeg.npz, ../shared/data/mnist_train.npz; the CIFAR-10 rows are skipped when that
# file is missing)
set -euo pipefail
OUT=${1:-runs/int8}
CIFAR_TEST=${2:-../shared/data/cifar10_test_jpeg.npz}
MNIST_TRAIN=${3:-../shared/data/mnist_train.npz}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
dfkd() { python -m dfkd "$@"; }
MNIST_TEST=examples/mnist_test.npz

# --- MNIST: float students, then the quantization error of PTQ per calibration source over 3 seeds ------------
# name  teacher  method  calibration sources (bench/calib_error.py SOURCES; real: 512 MNIST training images)
mnist=("lenet5 examples/mnist_lenet5.pt dfad noise real zskd dfad deepinversion"
       "lenet5_bn examples/mnist_lenet5_bn.pt fast noise real zskd deepinversion zeroq"
       "lenet5_bn-dfq examples/mnist_lenet5_bn.pt dfq noise real zskd deepinversion zeroq")
for row in "${mnist[@]}"; do
  read -r name teacher method sources <<<"$row"
  float="$OUT/float-$name"
  [ -f "$float/student.pt" ] || dfkd distill --teacher "$teacher" --method "$method" --steps 1500 \
      --eval-data "$MNIST_TEST" --fid-every 0 --out "$float" >"$float.log" 2>&1
  [ -f "$OUT/calib-$name.jsonl" ] && continue
  # shellcheck disable=SC2086
  python bench/calib_error.py --model "$float/student.pt" --teacher "$teacher" --eval-data "$MNIST_TEST" \
      --real "$MNIST_TRAIN" --sources $sources --seeds 0 1 2 --methods minmax percentile \
      --cache "$OUT/calib-cache" --out "$OUT/calib-$name.jsonl" >"$OUT/calib-$name.log" 2>&1
done
# Entropy ranges on one student (every source, 3 seeds: the calibration images are cached above).
[ -f "$OUT/calib-lenet5_bn-entropy.jsonl" ] || python bench/calib_error.py --model "$OUT/float-lenet5_bn/student.pt" \
    --teacher examples/mnist_lenet5_bn.pt --eval-data "$MNIST_TEST" --real "$MNIST_TRAIN" \
    --sources noise real zskd deepinversion zeroq --seeds 0 1 2 --methods entropy --cache "$OUT/calib-cache" \
    --out "$OUT/calib-lenet5_bn-entropy.jsonl" >"$OUT/calib-lenet5_bn-entropy.log" 2>&1
# What a deployer runs: the default calibration (zskd) and the noise reference, through `dfkd quantize`.
for row in "lenet5 examples/mnist_lenet5.pt" "lenet5_bn examples/mnist_lenet5_bn.pt"; do
  read -r name teacher <<<"$row"
  for c in zskd noise; do
    [ -f "$OUT/ptq-$name-$c.onnx" ] || dfkd quantize "$OUT/float-$name/student.pt" --teacher "$teacher" \
        --calibration "$c" --eval-data "$MNIST_TEST" --out "$OUT/ptq-$name-$c.onnx" >"$OUT/ptq-$name-$c.log" 2>&1
  done
done
# QAT-by-distillation.
for row in "lenet5 examples/mnist_lenet5.pt dfad" "lenet5_bn examples/mnist_lenet5_bn.pt fast"; do
  read -r name teacher method <<<"$row"
  qat="$OUT/qat-$name"
  [ -f "$qat/student_int8.onnx" ] || dfkd distill --teacher "$teacher" --method "$method" --steps 1500 \
      --eval-data "$MNIST_TEST" --fid-every 0 --quantize int8 --out "$qat" >"$qat.log" 2>&1
done

# --- CIFAR-10: 10 CPU-minutes of dfq into WRN-16-1, float and QAT; PTQ per source -------------------------------
if [ -f "$CIFAR_TEST" ]; then
  T=examples/cifar10_wrn16_1.pt
  budget=(--budget-minutes 10 --budget-clock cpu --student wrn_16_1 --eval-data "$CIFAR_TEST" --fid-every 0)
  [ -f "$OUT/float-cifar10/student.pt" ] || dfkd distill --teacher $T --method dfq "${budget[@]}" \
      --out "$OUT/float-cifar10" >"$OUT/float-cifar10.log" 2>&1
  [ -f "$OUT/qat-cifar10/student_int8.onnx" ] || dfkd distill --teacher $T --method dfq "${budget[@]}" \
      --quantize int8 --out "$OUT/qat-cifar10" >"$OUT/qat-cifar10.log" 2>&1
  # CIFAR inversion cut for a loaded CPU: one batch of 64 images, 100 iterations (recipes: zeroq 500,
  # deepinversion 2000; ZeroQ itself calibrates on one batch of 32).
  inv="-p iterations=100 -p synth_batch_size=64 --num-calibration 64"
  for c in "zeroq:zeroq $inv" "deepinversion:deepinversion $inv" "dfq:dfq --synth-steps 200" \
           "test:$CIFAR_TEST" "noise:noise"; do
    tag=${c%%:*}
    [ -f "$OUT/ptq-cifar10-$tag.onnx" ] && continue
    # shellcheck disable=SC2086
    dfkd quantize "$OUT/float-cifar10/student.pt" --teacher $T --eval-data "$CIFAR_TEST" --num-calibration 256 \
        --calibration ${c#*:} --out "$OUT/ptq-cifar10-$tag.onnx" >"$OUT/ptq-cifar10-$tag.log" 2>&1
  done
fi

for f in "$OUT"/calib-*.log; do echo "== $f"; grep -E "^\||float top-1" "$f"; done
for f in "$OUT"/ptq-*.log; do echo "== $f"; grep -E "size|latency|top-1|agreement|int8 vs float|calibration:" "$f"; done
for f in "$OUT"/qat-*/deploy.json; do echo "== $f"; cat "$f"; done
