"""MNIST benchmark: every registered method at fixed budgets (CPU-minutes), LeNet-5(-BN) teacher -> LeNet-5-half.

    python bench/run.py                       # budgets 2, 5, 10 minutes, both teachers, every method
    python bench/run.py --quick               # 1-minute budget, BN teacher only: a smoke pass over everything
    python bench/run.py --methods dfad dafl --budgets 5 --teachers lenet5_bn
    python bench/run.py --methods auto fast --budgets 10  # auto: its row says which method it picked
    python bench/run.py --budgets 10 --jobs 2  # two runs at a time, one thread each

A budget counts each run's own CPU time (`--budget-clock cpu`), so a run on a machine shared with other jobs gets
the same compute as on an idle one, only later; `--clock wall` counts wall-clock time instead.

Teachers are the shipped examples/mnist_<arch>.pt (or --teacher-file ARCH=FILE); any other architecture is
trained once with `dfkd train-teacher` and cached in bench/teachers/. Methods that match BatchNorm statistics
(`uses_bn`) run only on teachers that have BatchNorm (their row says n/a otherwise; --all-pairs runs them anyway).
Each run is a separate `dfkd distill` process (so peak memory is its own). Results go to bench/results/ as
results.json and results.md; the table has: student top-1, % of teacher, synthetic samples/s, student steps/s,
synthesis share of the time, peak RSS; a second table, per method, has two ratios from bench/overhead.py: a
round's wall time over the bare forward/backward time of the same networks at the same batch sizes ("x bare"), and
over the time inside PyTorch operators ("x ops", the Python/framework share alone). --ratios-only makes just that.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
#: This checkout's dfkd (the `dfkd` on PATH may be another checkout's editable install).
DFKD = [sys.executable, "-m", "dfkd"]
#: `--methods auto` runs `dfkd distill --method auto` (dfkd.auto picks the method; its row names the pick).
AUTO = "auto"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", default=str(DATA / "mnist_train.npz"))
    ap.add_argument("--test", default=str(DATA / "mnist_test.npz"))
    ap.add_argument("--teachers", nargs="+", default=["lenet5", "lenet5_bn"])
    ap.add_argument("--teacher-file", action="append", default=[], metavar="ARCH=FILE",
                    help="use this teacher file for ARCH instead of training one")
    ap.add_argument("--methods", nargs="+", default=None,
                    help="default: every registered data-free method; `auto` runs --method auto")
    ap.add_argument("--budgets", nargs="+", type=float, default=[2, 5, 10], help="minutes")
    ap.add_argument("--quick", action="store_true", help="1-minute budget, lenet5_bn only")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at a time; with more than one, each gets cores/jobs torch threads")
    ap.add_argument("--all-pairs", action="store_true",
                    help="also run BN-statistics methods on teachers without BatchNorm")
    ap.add_argument("--ratios-only", action="store_true", help="only the cost-of-a-round table, no timed runs")
    ap.add_argument("--no-ratios", action="store_true", help="only the timed runs, no cost-of-a-round table")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="what a budget counts: each run's own CPU time (default; fair when the machine is shared) "
                    "or wall-clock time")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")
    return args


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
                        "--epochs", "12", "--precision", "fp32", "--out", str(path)], check=True)
    return path


def child_env(jobs: int) -> dict[str, str]:
    """The environment of each run: with several jobs, the cores are shared out as torch threads."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), *filter(None, [env.get("PYTHONPATH")])])
    if jobs > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def has_batchnorm(teacher: Path) -> bool:
    from dfkd.teacher import load_teacher

    return bool(load_teacher(str(teacher)).bn_paths())


def pairs(teachers: dict[str, Path], methods: list[str], all_pairs: bool) -> list[tuple[str, str, bool]]:
    """(teacher arch, method, run it?) for every pair; BN-statistics methods skip BN-free teachers."""
    from dfkd.methods import get_method

    bn = {arch: has_batchnorm(path) for arch, path in teachers.items()}
    return [(arch, m, all_pairs or bn[arch] or m == AUTO or not get_method(m).uses_bn) for arch in teachers
            for m in methods]


def evaluate(model: Path, test: str, extra: Sequence[str] = ()) -> float:
    """Top-1 of `model` on `test` (`extra`: teacher options for a file without its own, e.g. a state_dict)."""
    res = subprocess.run([*DFKD, "evaluate", "--model", str(model), "--data", test, "--json", *extra],
                         capture_output=True, text=True, env=child_env(1))
    if res.returncode != 0:  # dfkd's own line (a missing file, a data file that does not fit), not a traceback
        raise SystemExit(f"dfkd evaluate --model {model} --data {test}: "
                         f"{(res.stderr.strip().splitlines() or ['exit ' + str(res.returncode)])[-1]}")
    return json.loads(res.stdout)["top1"]


def run_one(teacher: Path, method: str, minutes: float, args: argparse.Namespace, out: Path,
            extra: Sequence[str] = ()) -> dict:
    """One `dfkd distill` run at a budget of minutes; its row of the table (`extra`: more distill options)."""
    cmd = [*DFKD, "distill", "--teacher", str(teacher), "--method", method, "--budget-minutes", str(minutes),
           "--budget-clock", args.clock,
           "--eval-data", args.test, "--eval-every", "1000000", "--seed", str(args.seed), "--out", str(out), *extra]
    if out.exists():  # a fresh measurement: a run folder left by an earlier (or stopped) bench is replaced
        shutil.rmtree(out)
    t0 = time.time()
    log = out.parent / f"{out.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(args.jobs))
        _, status, usage = os.wait4(proc.pid, 0)  # per-child resource usage: this run's own peak memory
    row = {"method": method, "budget_min": minutes, "wall_s": round(time.time() - t0, 1),
           "command": " ".join(cmd), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}
    if os.waitstatus_to_exitcode(status) != 0:
        row["error"] = (log.read_text().strip().splitlines() or ["?"])[-1].removeprefix("error: ")
        return row
    return {**row, **read_run(out)}


def metrics(out: Path) -> list[dict]:
    """The records of a run folder's metrics.jsonl."""
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def read_run(out: Path) -> dict:
    """A finished run folder's part of its row: top-1, steps, mean throughput, and what `auto` picked."""
    records = metrics(out)
    perf = [r for r in records if "perf/samples_per_s" in r]
    final = [r for r in records if r.get("event") == "finished"][-1]
    row = {"top1": final.get("student/top1"), "steps": final["step"]}
    if perf:
        for key in ("samples_per_s", "steps_per_s", "synthesis_share"):
            vals = [r[f"perf/{key}"] for r in perf if f"perf/{key}" in r]
            row[key] = sum(vals) / len(vals) if vals else None
    config = json.loads((out / "config.json").read_text())
    choice = config.get("auto_choice")  # dfkd.auto records it there, and which settings its row set
    if choice:
        row["picked"] = picked(choice, config["params"])
    return row


def picked(choice: dict, params: dict) -> str:
    """What auto picked, as a table shows it: "fast, recipe cpu", with any other setting its row set ("oh 2.0")."""
    words = [choice["method"], *[f"recipe {choice['recipe']}"] * bool(choice.get("recipe"))]
    words += [f"{k} {params[k]}" for k in choice.get("set_by_auto", ()) if k != "recipe"]
    return ", ".join(words)


def method_label(row: dict) -> str:
    """The method as a table shows it: `auto (fast)` for an auto run, with the method it picked; `-p` settings the
    run was given follow in brackets, e.g. `dfad [recipe=paper]`."""
    label = f"{row['method']} ({row['picked']})" if row.get("picked") else row["method"]
    return label + "".join(f" [{kv}]" for kv in row.get("params", ()))


def overhead(teacher: Path, method: str, jobs: int) -> dict:
    """bench/overhead.py's ratios for one method ({} if it failed)."""
    res = subprocess.run([sys.executable, str(HERE / "overhead.py"), str(teacher), method], capture_output=True,
                         text=True, timeout=900, env=child_env(jobs))
    try:
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {}


def header(args: argparse.Namespace) -> str:
    """When, where and with what command the table was made."""
    threads = child_env(args.jobs).get("OMP_NUM_THREADS", "default")
    return (f"`{' '.join(['python', *sys.argv])}` on {time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} CPU "
            f"cores, {args.jobs} run(s) at a time, torch threads per run: {threads}\n\n")


def markdown(rows: list[dict], teachers: dict[str, float]) -> str:
    """The runs table: one row per (teacher, method, budget)."""
    lines = ["| teacher (top-1) | method | budget | student top-1 | % of teacher | samples/s | student steps/s | "
             "synthesis share | peak RSS MB |", "|" + "---|" * 9]
    for r in sorted(rows, key=lambda r: (r["teacher"], r["method"], r["budget_min"])):
        t = teachers[r["teacher"]]
        head = f"| {r['teacher']} ({100 * t:.2f}) | {method_label(r)} | {r['budget_min']:g} min | "
        if "skipped" in r or "error" in r:
            what = f"n/a: {r['skipped']}" if "skipped" in r else f"error: {r['error'][:60]}"
            lines.append(head + what + " |" * 6)
            continue
        pct = 100 * r["top1"] / t if r.get("top1") is not None else float("nan")
        share = r.get("synthesis_share")
        lines.append(
            f"{head}{100 * r['top1']:.2f} | {pct:.1f} | {r.get('samples_per_s') or 0:.0f} | "
            f"{r.get('steps_per_s') or 0:.2f} | {'' if share is None else f'{100 * share:.0f} %'} | "
            f"{r.get('peak_rss_mb')} |")
    return "\n".join(lines) + "\n"


def cost_table(ratios: dict[str, dict]) -> str:
    """The per-method table of bench/overhead.py: how close a round runs to its networks' bare compute."""
    lines = ["| method | measured on | round s | bare fwd/bwd s | network calls | x bare | x ops |", "|" + "---|" * 7]
    for method, r in sorted(ratios.items()):
        if not r.get("bare_ratio"):
            lines.append(f"| {method} | {r.get('teacher', '')} | failed |" + " |" * 4)
            continue
        lines.append(f"| {method} | {r['teacher']} | {r['round_s']:.3f} | {r['bare_s']:.3f} | {r['calls']} | "
                     f"{r['bare_ratio']:.2f} | {r['op_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def write(out: Path, args: argparse.Namespace, rows: list[dict], ratios: dict[str, dict],
          teachers: dict[str, float]) -> str:
    """results.json and results.md (header, runs table, cost table); returns the markdown."""
    md = header(args)
    if rows:
        md += markdown(rows, teachers) + "\n"
    if ratios:
        md += "Cost of a round (inner loops cut to 10):\n\n" + cost_table(ratios)
    (out / "results.json").write_text(json.dumps({"teachers": teachers, "rows": rows, "cost": ratios}, indent=1))
    (out / "results.md").write_text(md)
    return md


def main() -> None:
    args = parse()
    if args.quick:
        args.budgets, args.teachers = [1.0], ["lenet5_bn"]
    from dfkd.methods import list_methods

    methods = args.methods or [m for m in list_methods() if m not in ("transfer", "kd", "crossmodal")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teachers = {a: teacher_path(a, args) for a in args.teachers}
    teacher_acc = {a: evaluate(p, args.test) for a, p in teachers.items()}
    plan = pairs(teachers, methods, args.all_pairs)
    rows: list[dict] = []
    ratios: dict[str, dict] = {}
    # A round's cost depends on the architecture, not the weights: measured once per method, one at a time before
    # the timed runs, on the first teacher it runs on.
    for arch, method, run in plan:
        if run and method != AUTO and method not in ratios and not args.no_ratios:  # auto: its pick's ratio
            ratios[method] = {"teacher": arch, **overhead(teachers[arch], method, args.jobs)}
    if args.ratios_only:
        print(write(out, args, rows, ratios, teacher_acc))
        return

    def job(arch: str, method: str, minutes: float) -> dict:
        print(f"{arch} {method} {minutes:g} min ...", flush=True)
        row = run_one(teachers[arch], method, minutes, args, out / "runs" / f"{arch}-{method}-{minutes:g}")
        return {**row, "teacher": arch}

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = []
        for arch, method, run in plan:
            for minutes in args.budgets:
                if run:
                    futures.append(pool.submit(job, arch, method, minutes))
                else:
                    rows.append({"teacher": arch, "method": method, "budget_min": minutes,
                                 "skipped": "needs BatchNorm (the teacher has none)"})
        for f in futures:
            rows.append(f.result())
            print(json.dumps(rows[-1]), flush=True)
            write(out, args, rows, ratios, teacher_acc)
    print(write(out, args, rows, ratios, teacher_acc))


if __name__ == "__main__":
    main()
