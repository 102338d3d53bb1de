"""Keep some classes of an .npz image set (x, y), e.g. MNIST 0-4 and 5-9 for the `dfkd extend` demo.

    python bench/split_classes.py ../shared/data/mnist_train.npz 0-4 runs/mnist_train_0to4.npz
"""

from __future__ import annotations

import argparse

import numpy as np


def class_range(text: str) -> tuple[int, int]:
    """"LO-HI" (inclusive) or a single class "N", as argparse's type."""
    parts = text.split("-")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: give LO-HI (e.g. 0-4) or one class (e.g. 5)")
    lo, hi = int(parts[0]), int(parts[-1])
    if lo > hi:
        raise argparse.ArgumentTypeError(f"{text!r}: LO must not exceed HI")
    return lo, hi


def main() -> None:
    """Write the images of classes LO..HI (labels unchanged) of IN to OUT."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("classes", type=class_range, help="LO-HI, inclusive, or one class N")
    ap.add_argument("out")
    a = ap.parse_args()
    lo, hi = a.classes
    with np.load(a.src, allow_pickle=False) as d:
        keep = (d["y"] >= lo) & (d["y"] <= hi)
        np.savez(a.out, x=d["x"][keep], y=d["y"][keep])
    print(f"{a.out}: {int(keep.sum())} images of classes {lo}..{hi}")


if __name__ == "__main__":
    main()
