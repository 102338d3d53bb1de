"""Keep some classes of an .npz image set (x, y), e.g. MNIST 0-4 and 5-9 for the `dfkd extend` demo.

    python bench/split_classes.py ../shared/data/mnist_train.npz 0-4 runs/mnist_train_0to4.npz
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    """Write the images of classes LO..HI (labels unchanged) of IN to OUT."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("classes", help="LO-HI, inclusive")
    ap.add_argument("out")
    a = ap.parse_args()
    lo, hi = (int(v) for v in a.classes.split("-"))
    with np.load(a.src, allow_pickle=False) as d:
        keep = (d["y"] >= lo) & (d["y"] <= hi)
        np.savez(a.out, x=d["x"][keep], y=d["y"][keep])
    print(f"{a.out}: {int(keep.sum())} images of classes {lo}..{hi}")


if __name__ == "__main__":
    main()
