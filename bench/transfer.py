"""Transfer data vs distilling in place: the same method, teacher, student and number of student steps.

    OMP_NUM_THREADS=1 python bench/transfer.py --steps 300 --num 1536

For each teacher and method: (1) in place, `dfkd distill --teacher T --method M --steps S`; (2) the owner's side,
`dfkd synthesize --teacher T --method M --num N` (deepinversion with -p s_steps=0: its images do not depend on
the student; a generator method such as dfq with --steps G, default 300, before its generator is sampled); (3) the
receiver's side, `dfkd distill --transfer-data FILE --steps S` with no teacher file. Prints
one table row per pair (test top-1 on --eval-data, and the ratio file / in place), and appends each result as a
JSON line to --results.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYNTH_EXTRA = {"deepinversion": ["-p", "s_steps=0"]}
GENERATOR_METHODS = ("dafl", "dfad", "dfq", "zskt")


def dfkd(*args: str) -> tuple[str, float]:
    """Run `python -m dfkd ARGS` from the repository root; its output and wall seconds."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "dfkd", *args], cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"dfkd {' '.join(args)} failed:\n{res.stderr[-2000:]}")
    return res.stdout, time.perf_counter() - t0


def top1(out: str) -> float:
    m = re.search(r"test top-1 ([0-9.]+)%", out)
    return float(m.group(1)) if m else float("nan")


def one(teacher: str, method: str, a: argparse.Namespace, work: Path) -> dict:
    name = Path(teacher).stem
    common = ["--student", a.student, "--steps", str(a.steps), "--eval-data", a.eval_data, "--fid-every", "0",
              "--device", "cpu"]
    row = {"teacher": name, "method": method, "steps": a.steps, "num": a.num}
    if not a.skip_inplace:
        out, row["inplace_s"] = dfkd("distill", "--teacher", teacher, "--method", method, *common,
                                     "--out", str(work / f"{name}-{method}-inplace"))
        row["inplace"] = top1(out)
    file = work / f"{name}-{method}.npz"
    _, row["synth_s"] = dfkd("synthesize", "--teacher", teacher, "--method", method, "--num", str(a.num),
                             "--out", str(file), "--force", "--device", "cpu", *SYNTH_EXTRA.get(method, []),
                             *(["--steps", str(a.generator_steps)] if method in GENERATOR_METHODS else []))
    out, row["file_s"] = dfkd("distill", "--transfer-data", str(file), *common, "--out",
                              str(work / f"{name}-{method}-file"))
    row["file"] = top1(out)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teachers", nargs="+", default=["examples/mnist_lenet5_bn.pt", "examples/mnist_lenet5.pt"])
    ap.add_argument("--methods", nargs="+", default=["deepinversion", "fast", "dfq"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--num", type=int, default=1536)
    ap.add_argument("--generator-steps", type=int, default=300, help="Training steps of a generator method before "
                    "its generator is sampled (synthesize --steps; the in-place run trains as many).")
    ap.add_argument("--student", default="lenet5_half")
    ap.add_argument("--eval-data", default="examples/mnist_test.npz")
    ap.add_argument("--work", default="bench/results/transfer")
    ap.add_argument("--results", default="bench/results/transfer.jsonl")
    ap.add_argument("--skip-inplace", action="store_true", help="Only the file side (in-place numbers from before).")
    a = ap.parse_args()
    work = ROOT / a.work / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True)
    print("| teacher | method | in place | from file | file / in place | --num |")
    for teacher in a.teachers:
        for method in a.methods:
            row = one(teacher, method, a, work)
            with open(ROOT / a.results, "a") as f:
                f.write(json.dumps(row) + "\n")
            ratio = row["file"] / row["inplace"] if "inplace" in row else float("nan")
            print(f"| {row['teacher']} | {method} | {row.get('inplace', float('nan')):.2f} | {row['file']:.2f} | "
                  f"{ratio:.3f} | {a.num} |", flush=True)


if __name__ == "__main__":
    main()
