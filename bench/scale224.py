"""224 px smoke run of every method on a torchvision ResNet-18 teacher: peak memory (RSS) per method.

    OMP_NUM_THREADS=1 python bench/scale224.py                    # every method, one at a time
    OMP_NUM_THREADS=1 python bench/scale224.py --methods dfad cmi --steps 4

Each method runs as its own process (so its peak RSS is its own): a short `distill` of a 10-class torchvision
ResNet-18 teacher at 3 x 224 x 224 (random weights, BatchNorm statistics from a few batches of noise) into a
torchvision ResNet-18 student, with the method's own 224 px recipe (`dfkd methods --params NAME --teacher FILE`):
its default pool, memory bank, FID monitor (fid_samples 256, measured at the end of the run) and generator. Only
batch sizes and iterations per batch are cut (`CUTS`), for time: a step at 224 px takes seconds on one CPU thread.
`kd` reads a small random 224 px data set, `transfer` a small random transfer file, `crossmodal` pairs of that
data set's images and their grey versions (`dfkd.paired.make_paired`; its student sees the grey modality). The
table (peak RSS of the process from `os.wait4`, and what the run logged as perf/peak_rss_mib) goes to stdout and to
OUT/scale224.md.

The teacher is a dfkd model file naming `torchvision:resnet18` and the student `--student torchvision:resnet18`,
as a user with a torchvision model runs it.
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
ROOT = HERE.parent
LIMIT_MIB = 6 * 1024
ARCH = "torchvision:resnet18"
#: Smaller batches and fewer iterations per batch (never larger than the recipe's own); nothing else changes.
CUTS = {"batch_size": 8, "synth_batch_size": 8, "di_batch": 8, "iterations": 2, "di_iters": 2, "g_steps": 2,
        "s_steps": 2, "g_loops": 1, "gwp_loops": 1}  # NAYER's generator loops a batch (4) and warm-up batches (20)


def make_inputs(out: Path) -> tuple[Path, Path, Path, Path, Path]:
    """The teacher file, a small random 224 px data set, a small random transfer file, and the crossmodal pairs
    (that data set's images and their grey versions) with their grey test set: made once, returned as paths."""
    import numpy as np
    import torch

    from dfkd.archs import build_model
    from dfkd.modelfile import ModelFile, save_model
    from dfkd.paired import make_paired
    from dfkd.spec import InputSpec
    from dfkd.transfer import save_transfer

    teacher, data, transfer = out / "resnet18_224.pt", out / "random224.npz", out / "transfer224.npz"
    paired, paired_test = out / "paired224.npz", out / "paired224_test.npz"
    paths = teacher, data, transfer, paired, paired_test
    if all(p.exists() for p in paths):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    spec = InputSpec(3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    kwargs = {"num_classes": 10}
    torch.manual_seed(0)
    model = build_model(ARCH, kwargs).train()
    with torch.no_grad():  # BatchNorm statistics of a few batches of noise, not the default 0 / 1
        for _ in range(3):
            model(torch.randn(8, 3, 224, 224))
    save_model(teacher, model.eval(), ModelFile(ARCH, kwargs, spec, 10))
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.integers(0, 256, (32, 224, 224, 3), dtype=np.uint8), y=rng.integers(0, 10, 32))
    x = torch.from_numpy(rng.integers(0, 256, (32, 3, 224, 224), dtype=np.uint8))
    save_transfer(transfer, x, torch.softmax(torch.randn(32, 10), 1), spec, "random", "")
    make_paired(data, "gray", paired)
    make_paired(data, "gray", paired_test, student_only=True)
    return paths


def cuts_for(method: str, teacher_file: Path) -> dict:
    """CUTS where the method's 224 px recipe has that setting, never above the recipe's value."""
    from dfkd.methods import get_method
    from dfkd.teacher import load_teacher

    recipe = get_method(method).default_params(load_teacher(str(teacher_file)))
    return {k: min(v, recipe[k]) for k, v in CUTS.items() if isinstance(recipe.get(k), int) and recipe[k] > 0}


def child(args: argparse.Namespace) -> None:
    """One run, in this process: `distill` of the torchvision ResNet-18 teacher into another."""
    from dfkd.config import DistillConfig
    from dfkd.engine import distill

    teacher, data, transfer, paired, paired_test = make_inputs(Path(args.out))
    params = cuts_for(args.child, teacher)
    run = Path(args.out) / args.child
    if run.exists():
        shutil.rmtree(run)
    extra = {"data": str(data)} if args.child == "kd" else {}
    if args.child == "transfer":
        extra["transfer_data"] = str(transfer)
    eval_data = data
    if args.child == "crossmodal":  # the student sees the grey modality, and is measured on it
        extra["data"], eval_data = str(paired), paired_test
    cfg = DistillConfig(teachers=(str(teacher),), method=args.child, student=ARCH, steps=args.steps,
                        out=str(run), eval_data=str(eval_data), params=params, **extra)
    result = distill(cfg)
    print(json.dumps({"params": params, "steps": result.step, "logged_peak_rss_mib": result.peak_rss_mib}))


def run_method(method: str, args: argparse.Namespace) -> dict:
    """The child process for one method; its row (peak RSS from the kernel's accounting of that child)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--steps", str(args.steps),
           "--out", args.out]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    log = Path(args.out) / f"{method}.log"
    t0 = time.time()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    row = {"method": method, "wall_s": round(time.time() - t0, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024)}
    lines = log.read_text().strip().splitlines() or ["?"]
    if os.waitstatus_to_exitcode(status) != 0:
        row["error"] = lines[-1][:200]
    else:
        row.update(json.loads(lines[-1]))
    return row


def table(rows: list[dict], args: argparse.Namespace) -> str:
    head = ["| method | peak RSS (MiB) | logged by the run (MiB) | under 6 GB | steps | wall (s) | cut to |",
            "|---|---|---|---|---|---|---|"]
    for r in rows:
        cut = ", ".join(f"{k}={v}" for k, v in r.get("params", {}).items())
        ok = "error: " + r["error"] if "error" in r else ("yes" if r["peak_rss_mib"] < LIMIT_MIB else "**no**")
        head.append(f"| {r['method']} | {r['peak_rss_mib']} | {round(r.get('logged_peak_rss_mib', 0))} | {ok} | "
                    f"{r.get('steps', '')} | {r['wall_s']} | {cut} |")
    note = (f"\n{time.strftime('%Y-%m-%d')}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')}, "
            f"`python bench/scale224.py --steps {args.steps}`: torchvision ResNet-18 teacher (10 classes, 3 x 224 x "
            "224, random weights) -> torchvision ResNet-18 student, each method's 224 px recipe with its default "
            "pool, bank, FID monitor and generator, batches and iterations cut as shown.\n")
    return "\n".join(head) + "\n" + note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    ap.add_argument("--steps", type=int, default=4, help="student steps per run")
    ap.add_argument("--out", default=str(HERE / "results" / "scale224"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    from dfkd.methods import list_methods

    Path(args.out).mkdir(parents=True, exist_ok=True)
    make_inputs(Path(args.out))
    rows = []
    for method in args.methods or list_methods():
        rows.append(run_method(method, args))
        print(json.dumps(rows[-1]), flush=True)
    text = table(rows, args)
    (Path(args.out) / "scale224.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
