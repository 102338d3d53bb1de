#!/usr/bin/env bash
# The GPU checks, in one short command (TOTAL_SECONDS, default 480, on one GPU): what each speed setting computes
# against the CPU (bench/gpu_numerics.py), whether runs and resumes are bit-equal with and without --deterministic
# (bench/gpu_determinism.py), CUDA smoke runs under each --precision and --compile, torchrun with NCCL,
# the test suite on a CUDA machine (where the engine's default device `auto` is the GPU, so every distill test takes
# the CUDA path), and a short bench/gpu.py table (random teachers) in the time left.
#
#     pip install -e ".[dev]" && bash bench/gpu_check.sh            # logs and tables in bench/results/gpu_check
#     OUT=/somewhere SKIP_TESTS=1 BENCH_MINUTES=0.5 bash bench/gpu_check.sh
#
# Every step is time-boxed and logged on its own; summary.txt lists each step's exit status and seconds.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_check}
BENCH_MINUTES=${BENCH_MINUTES:-0.2}
DEADLINE=$((SECONDS + ${TOTAL_SECONDS:-480}))  # the benchmark gets what is left of this
mkdir -p "$OUT"
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

step() {  # step LOG SECONDS CMD...: run CMD under a time limit, append its output to LOG, record rc and time
    local log=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "\$ $*" >> "$OUT/$log.log"
    timeout "$limit" "$@" >> "$OUT/$log.log" 2>&1
    local rc=$?
    echo "$log: rc=$rc $((SECONDS - t0))s: $*" | cut -c1-220 | tee -a "$SUMMARY"
}

{ nvidia-smi -L; python -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda,
torch.cuda.get_device_name(), torch.cuda.is_bf16_supported())"; } >> "$SUMMARY" 2>&1

step numerics 120 python bench/gpu_numerics.py
step determinism 200 python bench/gpu_determinism.py

T=examples/mnist_lenet5_bn.pt
E=examples/mnist_test.npz
for p in fp32 bf16 fp16; do
    step smoke 90 python -m dfkd distill --teacher $T --method fast --device cuda --precision $p --steps 100 \
        --eval-data $E --eval-every 50 --fid-every 0 --out "$WORK/fast_$p"
done
step smoke 150 python -m dfkd distill --teacher $T --method fast --device cuda --precision bf16 --compile \
    --steps 100 --eval-data $E --eval-every 50 --fid-every 0 --out "$WORK/fast_bf16_compile"
step smoke 90 python -m dfkd distill --teacher examples/cifar10_wrn16_1.pt --method deepinversion --device cuda \
    --steps 20 --fid-every 20 --out "$WORK/di_cifar"
grep -h '"event": "finished"' "$WORK"/*/metrics.jsonl | cut -c1-300 >> "$OUT/smoke.log"

step torchrun 120 torchrun --standalone --nproc-per-node 1 -m dfkd distill --teacher $T --method dfad --device cuda \
    --steps 200 --eval-data $E --eval-every 100 --fid-every 0 --out "$WORK/dfad_torchrun"

if [ -z "${SKIP_TESTS:-}" ]; then
    WORKERS=()  # pytest-xdist, where installed, spreads the suite over the machine's cores
    python -c "import xdist" 2>/dev/null && WORKERS=(-n "${TEST_WORKERS:-14}")
    step tests 180 env OMP_NUM_THREADS=1 python -m pytest -q -p no:warnings -p no:cacheprovider \
        "${WORKERS[@]}" --durations=15
fi

LEFT=$((DEADLINE - SECONDS))
step bench $((LEFT > 30 ? LEFT : 30)) python bench/gpu.py --pairs resnet34 --methods fast cmi dfq deepinversion --compile-modes off \
    --minutes "$BENCH_MINUTES" --out "$WORK/bench"
cp "$WORK/bench/gpu.md" "$WORK/bench/gpu.json" "$OUT/" 2>/dev/null
cat "$SUMMARY"
