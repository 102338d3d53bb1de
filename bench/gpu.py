"""GPU benchmark: the papers' CIFAR-10 pairs, every speed setting side by side, in one command.

    python bench/gpu.py --teacher-file resnet34=r34.pt --teacher-file wrn_40_2=w402.pt \\
        --test ../shared/data/cifar10_test_jpeg.npz --minutes 5
    python bench/gpu.py --tiny          # CPU smoke test: random teachers, 2 steps a run, tiny inner loops

For each pair (ResNet-34 -> ResNet-18, WRN-40-2 -> WRN-16-1), each method (fast, cmi, dfq, deepinversion, with
their full CIFAR recipes) and each speed setting (--precision fp32 / bf16, --compile off / on), one
`python -m dfkd distill` run of --minutes; the table puts the settings of a pair and method next to each other:
student images/s and its speed-up over fp32 eager, share of time in synthesis, peak GPU memory (PyTorch's
allocator), peak RSS, and test top-1 at a quarter, half and the end of the budget (accuracy over time).
A pair without --teacher-file uses a randomly initialised teacher: speed and memory hold, accuracy is n/a.
Make real teachers with `dfkd train-teacher` (see the README). Results: <out>/gpu.md and <out>/gpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PAIRS = {"resnet34": "resnet18", "wrn_40_2": "wrn_16_1"}
GPU = "perf/peak_gpu_mib"
METHODS = ("fast", "cmi", "dfq", "deepinversion")
#: --tiny: each method's `quick` settings (small batches, short inner loops) and no held-out selection: the runs
#: check the script end to end, not the recipes.
TINY = {"select_every": 0, "watch_every": 0}  # select_every for the methods that keep a held-out set


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher-file", action="append", default=[], metavar="ARCH=FILE",
                    help="teacher for resnet34 or wrn_40_2 (default: random weights, accuracy n/a)")
    ap.add_argument("--test", default=None, help="CIFAR-10 test images (.npz) for the accuracy columns")
    ap.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--compile-modes", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--minutes", type=float, default=5.0, help="budget of each run")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: 2 steps a run, tiny inner loops")
    ap.add_argument("--out", default=str(HERE / "results" / "gpu"))
    args = ap.parse_args(argv)
    if args.tiny and args.device == "auto":
        args.device = "cpu"
    return args


def random_teacher(arch: str, path: Path) -> Path:
    """A CIFAR-10 `arch` with random weights (BatchNorm statistics from a few noise batches), as a model file."""
    import torch

    from dfkd.modelfile import ModelFile, save_model
    from dfkd.models import create
    from dfkd.spec import CIFAR10_SPEC

    kwargs = {"num_classes": 10, "in_channels": 3, "input_size": 32}
    torch.manual_seed(0)
    model = create(arch, **kwargs).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32))
    save_model(path, model.eval(), ModelFile(arch, kwargs, CIFAR10_SPEC, 10, None, {"kind": "random teacher"}))
    return path


def tiny_test_set(path: Path) -> Path:
    """64 random CIFAR-sized images with labels: enough to exercise the accuracy columns in --tiny."""
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, 10, 64))
    return path


def pythonpath() -> str:
    """This checkout first, then whatever PYTHONPATH already holds (packages installed to a --target folder)."""
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)


def log_config(run: Path, args: argparse.Namespace) -> Path:
    """A config file with the run's logging cadence (no flag sets it): every step in --tiny, else every 10."""
    path = run.parent / f"{run.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"log_every": 1 if args.tiny else 10, "image_every": 10**6 if args.tiny else 500}))
    return path


def command(teacher: Path, student: str, method: str, precision: str, compiled: bool, args: argparse.Namespace,
            test: str | None, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "dfkd", "distill", "--teacher", str(teacher), "--student", student,
           "--method", method, "--precision", precision, "--compile" if compiled else "--no-compile",
           "--device", args.device, "--out", str(out), "--fid-every", "0", "--config", str(log_config(out, args))]
    if args.tiny:
        cmd += ["--steps", "2", "--eval-every", "1"]
        from dfkd.methods import get_method

        cls = get_method(method)
        tiny = {**cls.quick, **{k: v for k, v in TINY.items() if cls.heldout or k != "select_every"}}
        cmd += [x for k, v in tiny.items() for x in ("-p", f"{k}={json.dumps(v)}")]
    else:
        cmd += ["--budget-minutes", f"{args.minutes:g}", "--eval-every", "100"]
    if test:
        cmd += ["--eval-data", test]
    return cmd


def summarise(run: Path) -> dict:
    """images/s, synthesis share, peak memories, and top-1 at 1/4, 1/2 and the end of the run's time."""
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    perf = [r for r in recs if "perf/samples_per_s" in r]
    elapsed = {r["step"]: r.get("perf/elapsed_s") for r in perf}
    acc = [(elapsed.get(r["step"]), r["student/top1"]) for r in recs if "student/top1" in r]
    acc = [(t, a) for t, a in acc if t is not None]
    fin = next((r for r in recs if r.get("event") == "finished"), {})
    total = fin.get("elapsed") or (acc[-1][0] if acc else 0.0)

    def top1_at(frac: float) -> float | None:
        seen = [a for t, a in acc if t <= frac * total + 1e-9]
        return seen[-1] if seen else None

    n = max(len(perf), 1)
    share = sum(r.get("perf/synthesis_share", 0.0) for r in perf) / n
    return {"images_per_s": sum(r["perf/samples_per_s"] for r in perf) / n, "synthesis_share": share,
            "peak_gpu_mib": max((r[GPU] for r in perf if GPU in r), default=None),
            "peak_rss_mib": fin.get("peak_rss_mib"),
            "top1_25": top1_at(0.25), "top1_50": top1_at(0.5), "top1_end": fin.get("student/top1"),
            "steps": fin.get("step"), "seconds": total}


def _fmt(v: float | None, pattern: str) -> str:
    return "n/a" if v is None else pattern.format(v)


def table(rows: list[dict], real: set[str]) -> str:
    lines = ["| pair | method | precision | compile | images/s | speed-up | synthesis share | peak GPU MiB | "
             "peak RSS MiB | top-1 @25% | @50% | end | steps | note |", "|" + "---|" * 14]
    base = {(r["pair"], r["method"]): r.get("images_per_s") for r in rows
            if r["precision"] == "fp32" and r["compile"] == "off" and "error" not in r}
    for r in rows:
        acc = r["teacher"] in real

        def pct(v: float | None, acc: bool = acc) -> str:
            return _fmt(100 * v if v is not None and acc else None, "{:.2f}")

        b = base.get((r["pair"], r["method"]))
        speed = r["images_per_s"] / b if b and r.get("images_per_s") else None
        lines.append(f"| {r['pair']} | {r['method']} | {r['precision']} | {r['compile']} | "
                     f"{_fmt(r.get('images_per_s'), '{:.1f}')} | {_fmt(speed, '{:.2f}x')} | "
                     f"{_fmt(r.get('synthesis_share'), '{:.2f}')} | {_fmt(r.get('peak_gpu_mib'), '{:.0f}')} | "
                     f"{_fmt(r.get('peak_rss_mib'), '{:.0f}')} | {pct(r.get('top1_25'))} | {pct(r.get('top1_50'))} | "
                     f"{pct(r.get('top1_end'))} | {r.get('steps', 'n/a')} | {r.get('error') or r.get('warning', '')} |")
    return "\n".join(lines)


def run_all(args: argparse.Namespace, write: Callable[[list[dict], set[str]], None]) -> list[dict]:
    """Every run of the grid, one after another; `write(rows, real)` after each, so a cut-short run keeps its table."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    given = dict(s.split("=", 1) for s in args.teacher_file)
    real = set(given) if not args.tiny else set(args.pairs)
    test = args.test or (str(tiny_test_set(out / "tiny_test.npz")) if args.tiny else None)
    rows = []
    for arch in args.pairs:
        teacher = Path(given[arch]) if arch in given else random_teacher(arch, out / f"random_{arch}.pt")
        for method in args.methods:
            for precision in args.precisions:
                for mode in args.compile_modes:
                    run = out / "runs" / f"{arch}-{method}-{precision}-compile_{mode}-{time.strftime('%H%M%S')}"
                    cmd = command(teacher, PAIRS[arch], method, precision, mode == "on", args, test, run)
                    print(" ".join(cmd), flush=True)
                    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                         env={**os.environ, "PYTHONPATH": pythonpath()})
                    row = {"pair": f"{arch}->{PAIRS[arch]}", "teacher": arch, "method": method,
                           "precision": precision, "compile": mode}
                    warn = [x for x in res.stderr.splitlines() if x.startswith("warning: --compile")]
                    if warn:
                        row["warning"] = "compile fell back to eager"
                    if res.returncode != 0:
                        row["error"] = (res.stderr.strip().splitlines() or ["failed"])[-1][:120]
                    else:
                        row.update(summarise(run))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    write(rows, real)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "CPU"
    head = (f"`python bench/gpu.py {' '.join(sys.argv[1:] if argv is None else argv)}` on "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {device}, torch {torch.__version__}")
    out = Path(args.out)

    def write(rows: list[dict], real: set[str]) -> None:
        (out / "gpu.json").write_text(json.dumps(rows, indent=2) + "\n")
        (out / "gpu.md").write_text(head + "\n\n" + table(rows, real) + "\n")

    rows = run_all(args, write)
    print((out / "gpu.md").read_text())
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
