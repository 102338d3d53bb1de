"""What label minimisation costs: one transfer file's images relabelled each way, a student distilled from each.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/labels.py --transfer FILE.npz --teacher examples/mnist_lenet5_bn.pt

Each variant keeps the file's images and recipe and replaces the labels with `dfkd.labels.minimise` of the
teacher's softmax (what `dfkd synthesize --labels ... --label-decimals ...` stores), then runs
`dfkd distill --transfer-data VARIANT --student lenet5_half --steps S` and prints the test top-1.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import torch

from dfkd.labels import minimise, parse_labels
from dfkd.teacher import load_teacher
from dfkd.transfer import load_transfer, save_transfer, teacher_probs

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = [("soft", None), ("soft", 2), ("topk=3", None), ("topk=1", None), ("hard", None),
            ("temperature=0.5", None)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transfer", required=True)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-data", default="examples/mnist_test.npz")
    ap.add_argument("--work", default="bench/results/labels")
    a = ap.parse_args()
    data, teacher = load_transfer(a.transfer), load_teacher(a.teacher)
    probs = teacher_probs(teacher, data.x, torch.device("cpu"))
    work = ROOT / a.work
    work.mkdir(parents=True, exist_ok=True)
    print(f"| --labels | --label-decimals | test top-1 after {a.steps} steps |")
    for text, decimals in VARIANTS:
        spec = parse_labels(text, decimals)
        name = spec.text().replace(", ", "-").replace(" ", "").replace("=", "")
        path = work / f"{Path(a.transfer).stem}-{name}.npz"
        prov = {**data.provenance, "labels": spec.text()}
        save_transfer(path, data.x, minimise(probs, spec), data.spec, data.method, data.teacher_sha256, prov,
                      data.recipe)
        res = subprocess.run([sys.executable, "-m", "dfkd", "distill", "--transfer-data", str(path), "--student",
                              "lenet5_half", "--steps", str(a.steps), "--eval-data", a.eval_data, "--fid-every", "0",
                              "--device", "cpu", "--out", str(work / f"run-{path.stem}")],
                             cwd=ROOT, capture_output=True, text=True)
        m = re.search(r"test top-1 ([0-9.]+)%", res.stdout)
        print(f"| {text} | {decimals if decimals is not None else '-'} | {m.group(1) if m else res.stderr[-300:]} |",
              flush=True)


if __name__ == "__main__":
    main()
