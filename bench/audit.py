"""Time and memory of `dfkd audit` at MNIST scale: N synthetic images against the 60k MNIST training images.

    OMP_NUM_THREADS=1 python bench/audit.py --num 10000 --against ../shared/data/mnist_train.npz \\
        --test ../shared/data/mnist_test.npz

The synthetic file comes from an untrained dfad generator (the audit's cost depends on the image count and size,
not on what the images show) unless --transfer names one. The audit runs as `python -m dfkd audit` in a child
process; its wall time, CPU time and peak RSS (the child's own ru_maxrss) are printed, with the audit's report.
On a shared machine the CPU time is the fairer figure: the wall time includes waiting for the cores.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Runs the CLI given as argv and prints its own peak RSS (ru_maxrss of this process alone) however it exits.
MEASURED = """
import resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_module("dfkd", run_name="__main__")
finally:
    r = resource.getrusage(resource.RUSAGE_SELF)
    print(f"peak RSS {r.ru_maxrss / 1024:.0f} MiB, CPU time {r.ru_utime + r.ru_stime:.1f} s (user + system)")
"""


def make_file(teacher: str, num: int, out: Path) -> None:
    code = ("from dfkd.teacher import load_teacher; from dfkd.transfer import synthesize; "
            f"synthesize(load_teacher({teacher!r}), 'dfad', {num}, {str(out)!r}, steps=0)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"making {num} synthetic images from {teacher} failed: "
                         f"{(res.stderr.strip().splitlines() or ['exit ' + str(res.returncode)])[-1]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=10_000)
    ap.add_argument("--against", default=str(ROOT.parent / "shared" / "data" / "mnist_train.npz"))
    ap.add_argument("--test", default=str(ROOT.parent / "shared" / "data" / "mnist_test.npz"))
    ap.add_argument("--teacher", default=str(ROOT / "examples" / "mnist_lenet5_bn.pt"))
    ap.add_argument("--transfer", default=None)
    ap.add_argument("--png", default=str(ROOT / "bench" / "results" / "audit_pairs.png"),
                    help="where the audit's picture of the nearest pairs is written (default: %(default)s)")
    a = ap.parse_args()
    a.png = str(Path(a.png).resolve())  # the audit runs in the project's root: a relative path is the caller's
    Path(a.png).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        transfer = Path(a.transfer) if a.transfer else Path(tmp) / "synthetic.npz"
        if not a.transfer:
            make_file(a.teacher, a.num, transfer)
        cmd = ["dfkd", "audit", str(transfer), "--against", a.against, "--test", a.test,
               "--teacher", a.teacher, "--png", a.png]
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", MEASURED, *cmd], cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    print(res.stdout + res.stderr[-2000:])
    print(f"audit of {a.num if not a.transfer else transfer} synthetic vs {a.against}: wall time {wall:.1f} s "
          f"(exit {res.returncode})")


if __name__ == "__main__":
    main()
