"""Manual check: every method on a torchvision ResNet-18 state_dict (10 classes), without --student.

    OMP_NUM_THREADS=1 python bench/real_teachers.py                      # 32 px, --steps 20, every method
    OMP_NUM_THREADS=1 python bench/real_teachers.py --size 64 --methods dfad deepinversion
    OMP_NUM_THREADS=1 python bench/real_teachers.py --arch timm:resnet18

Writes a randomly initialised ResNet-18 (its BatchNorm statistics warmed on noise) as a plain state_dict and runs
`python -m dfkd distill --teacher F --teacher-arch ARCH --channels 3 --input-size S --mean .. --std .. --method M
--steps N` for each method of `dfkd methods`, each in its own process, with the method's `quick` settings as -p
(batch 8, a few synthesis iterations: the papers' batch sizes and 2000-iteration inversions take hours per round on
a CPU; this checks that every method runs on a real architecture, not what it learns). `kd` gets --data (random
images), `transfer` --transfer-data (a `dfkd synthesize` file made first). Prints one line per method: ok/FAIL,
wall seconds, peak RSS of the run, the default student it picked, and the error line on failure; results.json
goes to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's dfkd, not an installed one
MEAN, STD = ["0.4914", "0.4822", "0.4465"], ["0.247", "0.243", "0.261"]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="torchvision:resnet18")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    ap.add_argument("--out", default=None, help="folder for runs and results.json (default: a temp folder)")
    return ap.parse_args(argv)


def make_teacher(arch: str, path: Path, size: int) -> None:
    import torch

    from dfkd.archs import build_model

    torch.manual_seed(0)
    model = build_model(arch, {"num_classes": 10}).train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, size, size) * 0.5)
    torch.save(model.eval().state_dict(), path)


def make_data(path: Path, size: int) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, (64, size, size, 3), dtype=np.uint8), y=rng.integers(0, 10, 64))


def run(cmd: list[str], log: Path) -> tuple[int, float, float]:
    """Return code, wall seconds and peak RSS (MB) of one dfkd process."""
    t0 = time.time()
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "dfkd", *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, time.time() - t0, usage.ru_maxrss / 1024


def method_flags(name: str, work: Path, teacher_flags: list[str]) -> list[str]:
    from dfkd.methods import get_method

    flags = sum((["-p", f"{k}={json.dumps(v)}"] for k, v in get_method(name).quick.items()), [])
    if name == "kd":
        flags += ["--data", str(work / "data.npz")]
    if name == "transfer":
        flags += ["--transfer-data", str(work / "transfer.npz")]
    return flags


def main(argv: list[str] | None = None) -> int:
    from dfkd.methods import list_methods

    args = parse(argv)
    work = Path(args.out or tempfile.mkdtemp(prefix="dfkd-real-"))
    work.mkdir(parents=True, exist_ok=True)
    teacher = work / "teacher_state_dict.pt"
    make_teacher(args.arch, teacher, args.size)
    make_data(work / "data.npz", args.size)
    tflags = ["--teacher", str(teacher), "--teacher-arch", args.arch, "--channels", "3", "--input-size",
              str(args.size), *sum((["--mean", m] for m in MEAN), []), *sum((["--std", s] for s in STD), [])]
    run(["synthesize", *tflags, "--method", "zskd", "--num", "16", "-p", "s_steps=0", "-p", "batch_size=8", "-p",
         "di_batch=8", "-p", "di_iters=3", "--out", str(work / "transfer.npz"), "--force"], work / "synthesize.log")
    results = []
    for name in args.methods or list_methods():
        out = work / f"run-{name}"
        cmd = ["distill", *tflags, "--method", name, "--steps", str(args.steps), "--fid-every", "0", "--out",
               str(out), *method_flags(name, work, tflags)]
        rc, wall, rss = run(cmd, work / f"{name}.log")
        lines = (work / f"{name}.log").read_text().strip().splitlines()
        student = json.loads((out / "config.json").read_text()).get("student") if (out / "config.json").exists() \
            else None
        row = {"method": name, "ok": rc == 0 and (out / "student.pt").exists(), "rc": rc, "wall_s": round(wall, 1),
               "peak_rss_mb": round(rss), "student": student, "last_line": lines[-1][:200] if lines else ""}
        results.append(row)
        print(f"{name:14s} {'ok' if row['ok'] else 'FAIL':4s} {row['wall_s']:7.1f} s {row['peak_rss_mb']:6d} MB  "
              f"student {student}" + ("" if row["ok"] else f"  {row['last_line']}"), flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(f"{sum(r['ok'] for r in results)}/{len(results)} methods ran; logs and results.json in {work}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
