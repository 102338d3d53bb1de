"""The int8 quantization error of one float student under each calibration source, over several seeds.

    OMP_NUM_THREADS=1 python bench/calib_error.py --model runs/int8/float-lenet5_bn/student.pt \\
        --teacher examples/mnist_lenet5_bn.pt --eval-data examples/mnist_test.npz \\
        --real ../shared/data/mnist_train.npz --sources noise deepinversion zeroq real --seeds 0 1 2 \\
        --methods minmax percentile entropy --out runs/calib/lenet5_bn-fast.json

For every (source, seed, range method) the student is quantized exactly as `dfkd quantize` does it
(`dfkd.quantize.quantize_model`: onnxruntime static QDQ, per-channel int8 weights) and the int8 file is compared
with the float ONNX file on every image of --eval-data: the fraction of images where both give the same top-1
class ("agreement"), the mean KL(float || int8) of their softmaxes, and the change of top-1 against the labels.
Top-1 against the labels moves by a few images in 10,000 whatever one does; agreement and KL measure the rounding
error itself. Calibration images of a source and seed are cached under --cache (they depend on the teacher, not
on the student), so further students of the same teacher cost only the quantizations.

Sources: `noise` (uniform random pixels, as `--calibration noise`), `real` (images of --real: the upper
reference; use training images, never the --eval-data ones), or a data-free method run on --teacher with the
flags listed in SOURCES, exactly as `dfkd quantize --calibration METHOD` runs it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dfkd.calibration import calibration_pixels
from dfkd.data import load_images, to_model_input
from dfkd.deploy import load_model_any
from dfkd.deploystats import mean_kl, onnx_logits, session
from dfkd.quantize import quantize_model
from dfkd.teacher import load_teacher

#: name -> (--calibration, -p overrides, --synth-steps): the flags `dfkd quantize` would be given.
SOURCES = {
    "noise": ("noise", {}, None),
    "deepinversion": ("deepinversion", {"s_steps": 0}, None),
    "zeroq": ("zeroq", {"s_steps": 0}, None),
    "zskd": ("zskd", {"s_steps": 0}, None),
    "dfad": ("dfad", {}, 500),
}


def pixels(name: str, args: argparse.Namespace, spec: object, seed: int) -> torch.Tensor:
    """uint8 calibration images of source `name` for `seed`, from the cache or made (and cached) now."""
    cache = Path(args.cache) / f"{Path(args.teacher).stem}-{name}-n{args.num}-s{seed}.pt"
    if cache.is_file():
        return torch.load(cache)
    teacher = load_teacher(args.teacher)
    source, params, steps = (args.real, {}, None) if name == "real" else SOURCES[name]
    t0 = time.process_time()
    x = calibration_pixels(source, args.num, spec, teacher, seed, "cpu", dict(params), steps)
    print(f"  {name} seed {seed}: {len(x)} images in {time.process_time() - t0:.0f} CPU-s", flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(x, cache)
    return x


def summary(rows: list[dict], key: str) -> dict[tuple[str, str], tuple[float, float, float, float]]:
    """(source, method) -> (mean, std, min, max) of `key` over seeds."""
    groups: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        groups.setdefault((r["source"], r["method"]), []).append(r[key])
    return {k: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, min(v), max(v))
            for k, v in groups.items()}


def _spread(s: tuple[float, float, float, float], scale: float, fmt: str) -> str:
    mean, std, lo, hi = (scale * v for v in s)
    return f"{mean:{fmt}} +- {std:{fmt}} ({lo:{fmt}}..{hi:{fmt}})"


def table(rows: list[dict]) -> str:
    """A markdown table: per source and range method, mean +- std (min..max) over seeds."""
    agree, kl, d1 = (summary(rows, k) for k in ("agreement", "kl", "top1_delta"))
    n = {k: sum(1 for r in rows if (r["source"], r["method"]) == k) for k in agree}
    out = ["| calibration | ranges | seeds | int8 = float top-1 % | mean KL(float \\|\\| int8) x1e-3 | "
           "int8 - float top-1 (points) |", "|---|---|---|---|---|---|"]
    for k in agree:
        a, b, c = agree[k], kl[k], d1[k]
        out.append(f"| {k[0]} | {k[1]} | {n[k]} | {_spread(a, 100, '.2f')} | {_spread(b, 1e3, '.2f')} "
                   f"| {100 * c[0]:+.2f} ({100 * c[2]:+.2f}..{100 * c[3]:+.2f}) |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--eval-data", required=True)
    ap.add_argument("--real", default=None, help="real images for the `real` source (training images)")
    ap.add_argument("--sources", nargs="+", default=["noise", "deepinversion", "zeroq"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["minmax"])
    ap.add_argument("--num", type=int, default=512)
    ap.add_argument("--cache", default="runs/calib/cache")
    ap.add_argument("--out", required=True, help="JSON lines of every measurement (appended)")
    args = ap.parse_args()
    model = load_model_any(args.model)
    data = load_images(args.eval_data, "--eval-data")
    rows = []
    with tempfile.TemporaryDirectory(prefix="calib-error-") as work:
        lf = None
        for name in args.sources:
            for seed in args.seeds:
                calib = to_model_input(pixels(name, args, model.spec, seed), model.spec)
                for method in args.methods:
                    q = quantize_model(model.module, model.spec, model.num_classes, calib, Path(work) / "q.onnx",
                                       work, force=True, method=method)
                    if lf is None:
                        lf = onnx_logits(session(q.float_onnx), data, model.spec)
                    lq = onnx_logits(session(q.int8), data, model.spec)
                    row = {"model": args.model, "source": name, "seed": seed, "method": method, "num": len(calib),
                           "agreement": float((lq.argmax(1) == lf.argmax(1)).float().mean()), "kl": mean_kl(lf, lq),
                           "top1_float": float((lf.argmax(1) == data.y).float().mean()),
                           "top1_delta": float((lq.argmax(1) == data.y).float().mean() - (lf.argmax(1) == data.y)
                                               .float().mean())}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
    print(f"\n{args.model}: float top-1 {100 * rows[0]['top1_float']:.2f}%, {len(data.y)} test images\n")
    print(table(rows))


if __name__ == "__main__":
    main()
