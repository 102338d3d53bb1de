"""Transfer data vs distilling in place: the same method, teacher, student, seed and number of student steps.

    OMP_NUM_THREADS=1 python bench/transfer.py            # the README table: both MNIST teachers x 3 methods

For each teacher, method and seed: (1) in place, `dfkd distill --teacher T --method M --student lenet5_half
--steps S`; (2) the owner's side, `dfkd synthesize --teacher T --method M --num N --out F` (N 5000: 500 images a
class of MNIST's 10, for every method; a generator method such as dfq trains its generator for S student steps
first, as long as in place, then is sampled class-balanced; fast stores each image with 3 crop views, each
labelled by the teacher: `synthesize`'s defaults); (3) the receiver's side, `dfkd distill --transfer-data F
--student lenet5_half --steps S` with no teacher file. Prints one table row per run (test top-1 on --eval-data,
and the ratio file / in place) and appends each result as a JSON line to --results. `--sides inplace` or
`--sides file` runs one side only (the table then reads the other side from --results: the latest row of the
same teacher, method, seed and steps).
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
GENERATOR_METHODS = ("dafl", "dfad", "dfq", "zskt")


def dfkd(*args: str) -> tuple[str, float]:
    """Run `python -m dfkd ARGS` from the repository root; its output and CPU seconds (children's user + sys)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = subprocess.run([sys.executable, "-m", "dfkd", *args], cwd=ROOT, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise SystemExit(f"dfkd {' '.join(args)} failed:\n{res.stderr[-2000:]}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return res.stdout, round(cpu, 1)


def top1(out: str) -> float:
    m = re.search(r"test top-1 ([0-9.]+)%", out)
    return float(m.group(1)) if m else float("nan")


def one(teacher: str, method: str, seed: int, a: argparse.Namespace, work: Path) -> dict:
    name = Path(teacher).stem
    common = ["--student", a.student, "--steps", str(a.steps), "--eval-data", a.eval_data, "--fid-every", "0",
              "--device", "cpu", "--seed", str(seed)]
    row = {"teacher": name, "method": method, "seed": seed, "steps": a.steps, "date": time.strftime("%Y-%m-%d")}
    tag = f"{name}-{method}-s{seed}"
    if "inplace" in a.sides:
        out, row["inplace_cpu_s"] = dfkd("distill", "--teacher", teacher, "--method", method, *common,
                                         "--out", str(work / f"{tag}-inplace"))
        row["inplace"] = top1(out)
    if "file" in a.sides:
        file = work / f"{tag}.npz"
        gen = ["--steps", str(a.steps)] if method in GENERATOR_METHODS else []
        out, row["synth_cpu_s"] = dfkd("synthesize", "--teacher", teacher, "--method", method, "--out", str(file),
                                       "--num", str(a.num), "--device", "cpu", "--seed", str(seed), *gen)
        row["num"] = int(re.search(r"wrote .*: (\d+) images", out).group(1))
        out, row["file_cpu_s"] = dfkd("distill", "--transfer-data", str(file), *common, "--out",
                                      str(work / f"{tag}-file"))
        row["file"] = top1(out)
    return row


def earlier(path: Path, row: dict, key: str) -> float | None:
    """The latest `key` of a result in `path` with the same teacher, method, seed and steps."""
    if not path.is_file():
        return None
    found = None
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if key in r and all(r.get(k) == row[k] for k in ("teacher", "method", "seed", "steps")):
            found = r[key]
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teachers", nargs="+", default=["examples/mnist_lenet5_bn.pt", "examples/mnist_lenet5.pt"])
    ap.add_argument("--methods", nargs="+", default=["deepinversion", "fast", "dfq"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--steps", type=int, default=1000, help="Student steps, in place and from the file.")
    ap.add_argument("--num", type=int, default=5000, help="Images in each transfer file (500 a class).")
    ap.add_argument("--sides", nargs="+", choices=["inplace", "file"], default=["inplace", "file"])
    ap.add_argument("--student", default="lenet5_half")
    ap.add_argument("--eval-data", default="examples/mnist_test.npz")
    ap.add_argument("--work", default="bench/results/transfer")
    ap.add_argument("--results", default="bench/results/transfer.jsonl")
    a = ap.parse_args()
    work = ROOT / a.work / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True)
    results = ROOT / a.results
    print("| teacher | method | seed | in place | from the file | file / in place | --num | steps |")
    for teacher in a.teachers:
        for method in a.methods:
            for seed in a.seeds:
                row = one(teacher, method, seed, a, work)
                with open(results, "a") as f:
                    f.write(json.dumps(row) + "\n")
                inplace = row.get("inplace", earlier(results, row, "inplace"))
                file = row.get("file", earlier(results, row, "file"))
                ratio = file / inplace if inplace and file else float("nan")
                print(f"| {row['teacher']} | {method} | {seed} | {inplace} | {file} | {ratio:.3f} | "
                      f"{row.get('num', '')} | {a.steps} |", flush=True)


if __name__ == "__main__":
    main()
