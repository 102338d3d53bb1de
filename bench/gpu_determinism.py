"""Are two GPU runs of one seed the same student, with and without `--deterministic`, and is a resume?

    python bench/gpu_determinism.py                       # on a CUDA machine, about 3 minutes
    python bench/gpu_determinism.py --device cpu --steps 60 --cases lenet  # the script itself, on a CPU (a run
        # too short ends before the interrupt the resume check sends)

Per case (DFAD on the MNIST demo teacher; fast on the CIFAR WRN-16-1), each a `dfkd distill` process of its own:
two plain runs; two `--deterministic` runs; a `--deterministic` run interrupted (SIGINT, as Ctrl-C: it saves a
checkpoint at the next round boundary) as soon as it logs its first step, then resumed in a new process. Prints
one table: whether each pair's students are bit-equal and their largest weight difference.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
#: name: (teacher file, method, student steps on a GPU)
CASES = {"lenet": ("examples/mnist_lenet5_bn.pt", "dfad", 200), "wrn": ("examples/cifar10_wrn16_1.pt", "fast", 40)}


def distill(args: list[str]) -> float:
    """Run `dfkd distill ARGS` in a new process; its wall time in seconds (a failure raises)."""
    t0 = time.time()
    done = subprocess.run([sys.executable, "-m", "dfkd", "distill", *args], capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"dfkd distill {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return time.time() - t0


def interrupted(out: Path, args: list[str]) -> int:
    """Start `dfkd distill ARGS --out OUT`, interrupt it once it logs a step; the step its checkpoint holds."""
    proc = subprocess.Popen([sys.executable, "-m", "dfkd", "distill", *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    metrics = out / "metrics.jsonl"
    while proc.poll() is None:
        if metrics.exists() and '"loss/' in metrics.read_text():
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.01)
    if proc.wait() != 130:
        why = "; it finished before the interrupt: give more --steps" if proc.returncode == 0 else ""
        raise SystemExit(f"the run to interrupt ended with exit status {proc.returncode}, not 130 (interrupted){why}")
    return int(torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["step"])


def difference(a: Path, b: Path) -> tuple[bool, float]:
    """Whether two runs' students are bit-equal, and their largest weight difference."""
    sa, sb = (torch.load(p / "student.pt", map_location="cpu", weights_only=True)["state_dict"] for p in (a, b))
    equal = sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    diff = max(((sa[k].float() - sb[k].float()).abs().max().item() for k in sa if sa[k].numel()), default=0.0)
    return equal, diff


def check(name: str, device: str, steps: int | None, work: Path) -> list[tuple[str, str, bool, float, float]]:
    """The three comparisons of one case: (case, pair, bit-equal, max difference, seconds of its first run)."""
    teacher, method, default_steps = CASES[name]
    n = steps or default_steps
    config = work / "log_every_step.toml"  # every step logged and checkpointed: the interrupt comes early
    config.write_text("log_every = 1\nckpt_every = 1\n")
    base = ["--teacher", str(ROOT / teacher), "--method", method, "--device", device, "--fid-every", "0",
            "--steps", str(n), "--config", str(config)]
    rows = []
    for pair, extra in (("plain", []), ("--deterministic", ["--deterministic"])):
        a, b = work / f"{name}_{pair}_a", work / f"{name}_{pair}_b"
        seconds = distill([*base, *extra, "--out", str(a)])
        distill([*base, *extra, "--out", str(b)])
        rows.append((name, f"two runs, {pair}", *difference(a, b), seconds))
    killed = work / f"{name}_resumed"
    t0 = time.time()
    at = interrupted(killed, [*base, "--deterministic"])
    distill(["--resume", str(killed)])
    rows.append((name, f"run vs interrupted at step {at} and resumed, --deterministic",
                 *difference(work / f"{name}_--deterministic_a", killed), time.time() - t0))
    return rows


def table(rows: list[tuple[str, str, bool, float, float]]) -> str:
    lines = ["| case | pair | bit-equal | max weight difference | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {c} | {p} | {'yes' if eq else 'no'} | {d:.2e} | {s:.1f} |" for c, p, eq, d, s in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=None, help="student steps per run (default: each case's)")
    ap.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in args.cases:
            rows += check(name, args.device, args.steps, Path(work))
            print(table(rows), flush=True)  # what is done so far, in case the caller's time runs out
    failed = [r for r in rows if "--deterministic" in r[1] and not r[2]]
    print(f"\n{len(failed)} --deterministic comparison(s) not bit-equal")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
