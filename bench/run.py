"""MNIST benchmark: every registered method at fixed wall-clock budgets, LeNet-5(-BN) teacher -> LeNet-5-half.

    python bench/run.py                       # budgets 2, 5, 10 minutes, both teachers, every method
    python bench/run.py --quick               # 1-minute budget, BN teacher only: a smoke pass over everything
    python bench/run.py --methods dfad dafl --budgets 5 --teachers lenet5_bn

Teachers are the shipped examples/mnist_<arch>.pt (or --teacher-file ARCH=FILE); any other architecture is
trained once with `dfkd train-teacher` and cached in bench/teachers/.
Each run is a separate `dfkd distill` process (so peak memory is its own). Results go to bench/results/ as
results.json and results.md; the table has: student top-1, % of teacher, synthetic samples/s, student steps/s,
synthesis share of the time, peak RSS, and the overhead ratio (wall time of a round over the time spent inside
PyTorch operators in it, from torch.profiler: 1.0 = no Python/framework overhead).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", default=str(DATA / "mnist_train.npz"))
    ap.add_argument("--test", default=str(DATA / "mnist_test.npz"))
    ap.add_argument("--teachers", nargs="+", default=["lenet5", "lenet5_bn"])
    ap.add_argument("--teacher-file", action="append", default=[], metavar="ARCH=FILE",
                    help="use this teacher file for ARCH instead of training one")
    ap.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    ap.add_argument("--budgets", nargs="+", type=float, default=[2, 5, 10], help="minutes")
    ap.add_argument("--quick", action="store_true", help="1-minute budget, lenet5_bn only")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def teacher_path(arch: str, args: argparse.Namespace) -> Path:
    given = dict(s.split("=", 1) for s in args.teacher_file)
    if arch in given:
        return Path(given[arch])
    shipped = HERE.parent / "examples" / f"mnist_{arch}.pt"  # the demo teachers, so results match the README
    if shipped.exists():
        return shipped
    path = HERE / "teachers" / f"mnist_{arch}.pt"
    if not path.exists():
        print(f"training teacher {arch} -> {path}", flush=True)
        subprocess.run(["dfkd", "train-teacher", "--data", args.train, "--arch", arch, "--eval-data", args.test,
                        "--epochs", "12", "--out", str(path)], check=True)
    return path


def evaluate(model: Path, test: str) -> float:
    out = subprocess.run(["dfkd", "evaluate", "--model", str(model), "--data", test, "--json"], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)["top1"]


def run_one(teacher: Path, method: str, minutes: float, args: argparse.Namespace, out: Path) -> dict:
    cmd = ["dfkd", "distill", "--teacher", str(teacher), "--method", method, "--budget-minutes", str(minutes),
           "--eval-data", args.test, "--eval-every", "1000000", "--seed", str(args.seed), "--out", str(out)]
    if out.exists():  # a fresh measurement: a run folder left by an earlier (or stopped) bench is replaced
        shutil.rmtree(out)
    t0 = time.time()
    log = out.parent / f"{out.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # per-child resource usage: this run's own peak memory
    row = {"method": method, "budget_min": minutes, "wall_s": round(time.time() - t0, 1),
           "command": " ".join(cmd), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}
    if os.waitstatus_to_exitcode(status) != 0:
        row["error"] = (log.read_text().strip().splitlines() or ["?"])[-1].removeprefix("error: ")
        return row
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    perf = [r for r in records if "perf/samples_per_s" in r]
    final = [r for r in records if r.get("event") == "finished"][-1]
    row.update(top1=final.get("student/top1"), steps=final["step"])
    if perf:
        for key in ("samples_per_s", "steps_per_s", "synthesis_share"):
            vals = [r[f"perf/{key}"] for r in perf if f"perf/{key}" in r]
            row[key] = sum(vals) / len(vals) if vals else None
    return row


def overhead_ratio(teacher: Path, method: str, rounds: int = 1) -> float | None:
    """Wall time of a round / time inside top-level PyTorch operators (torch.profiler), inner loops cut to 10."""
    code = f"""
import time, warnings, torch
from torch.profiler import profile, ProfilerActivity
from dfkd.teacher import load_teacher
from dfkd.methods import get_method
from dfkd.students import build_student, student_arch
warnings.simplefilter("ignore")
t = load_teacher({str(teacher)!r})
cls = get_method({method!r}); p = cls.default_params(t)
# The same networks at the same batch sizes, fewer repeats per round: the profiler multiplies a round's time.
p.update({{k: min(p[k], 10) for k in ("iterations", "di_iters", "g_steps", "s_steps") if k in p}})
name, kw = student_arch(t, None)
m = cls(t, build_student(name, kw), p, torch.device("cpu"))
m.round()
with profile(activities=[ProfilerActivity.CPU]) as prof:
    t0 = time.perf_counter()
    for _ in range({rounds}): m.round()
    wall = time.perf_counter() - t0
ops = sum(e.cpu_time_total for e in prof.events() if e.cpu_parent is None and
          (e.name.startswith("aten::") or e.name.startswith("autograd::") or "Backward" in e.name)) / 1e6
print(wall / ops if ops else float("nan"))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    try:
        return round(float(res.stdout.strip().splitlines()[-1]), 2)
    except (ValueError, IndexError):
        return None


def header() -> str:
    """When, where and with what command the table was made."""
    return (f"`{' '.join(['python', *sys.argv])}` on {time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} CPU "
            f"cores, torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')}\n\n")


def markdown(rows: list[dict], teachers: dict[str, float]) -> str:
    lines = ["| teacher (top-1) | method | budget | student top-1 | % of teacher | samples/s | student steps/s | "
             "synthesis share | peak RSS MB | overhead ratio |", "|" + "---|" * 10]
    for r in rows:
        t = teachers[r["teacher"]]
        if "error" in r:
            lines.append(f"| {r['teacher']} ({100 * t:.2f}) | {r['method']} | {r['budget_min']:g} min | "
                         f"error: {r['error'][:60]} |" + " |" * 6)
            continue
        pct = 100 * r["top1"] / t if r.get("top1") is not None else float("nan")
        share = r.get("synthesis_share")
        lines.append(
            f"| {r['teacher']} ({100 * t:.2f}) | {r['method']} | {r['budget_min']:g} min | {100 * r['top1']:.2f} | "
            f"{pct:.1f} | {r.get('samples_per_s') or 0:.0f} | {r.get('steps_per_s') or 0:.2f} | "
            f"{'' if share is None else f'{100 * share:.0f} %'} | {r.get('peak_rss_mb')} | "
            f"{r.get('overhead_ratio') or ''} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse()
    if args.quick:
        args.budgets, args.teachers = [1.0], ["lenet5_bn"]
    from dfkd.methods import list_methods

    methods = args.methods or [m for m in list_methods() if m not in ("transfer", "kd")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teachers = {a: teacher_path(a, args) for a in args.teachers}
    teacher_acc = {a: evaluate(p, args.test) for a, p in teachers.items()}
    rows: list[dict] = []
    ratios: dict[str, float | None] = {}  # the loop's overhead does not depend on the teacher: measured once
    for arch, path in teachers.items():
        for method in methods:
            if method not in ratios:
                ratios[method] = overhead_ratio(path, method)
            ratio = ratios[method]
            for minutes in args.budgets:
                print(f"{arch} {method} {minutes:g} min ...", flush=True)
                row = run_one(path, method, minutes, args, out / "runs" / f"{arch}-{method}-{minutes:g}")
                row.update(teacher=arch, overhead_ratio=ratio)
                rows.append(row)
                print(json.dumps(row), flush=True)
                (out / "results.json").write_text(json.dumps({"teachers": teacher_acc, "rows": rows}, indent=1))
                (out / "results.md").write_text(header() + markdown(rows, teacher_acc))
    print(markdown(rows, teacher_acc))


if __name__ == "__main__":
    main()
