"""Build paired two-modality files for `dfkd distill --method crossmodal` from a labelled image set.

    python bench/make_paired.py ../shared/data/mnist_train.npz edges runs/mnist_edges_pairs.npz
    python bench/make_paired.py ../shared/data/mnist_test.npz edges runs/mnist_edges_test.npz --student-only

Modality A is the images as they are, B their Sobel edge map (`edges`) or grey version (`gray`); the pair file has
no labels. `--student-only` writes B with the labels (x, y): a test set for `--eval-data`, or a training set for
the supervised reference (`dfkd train-teacher`).
"""

from __future__ import annotations

import argparse

from dfkd.paired import KINDS, make_paired


def main() -> None:
    """Parse the arguments and write the file."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("kind", choices=KINDS)
    ap.add_argument("out")
    ap.add_argument("--student-only", action="store_true", help="write modality B with labels (x, y)")
    ap.add_argument("--limit", type=int, default=None, help="keep the first N images")
    a = ap.parse_args()
    n = make_paired(a.src, a.kind, a.out, a.student_only, a.limit)
    print(f"{a.out}: {n} images ({'B with labels' if a.student_only else 'A/B pairs'}, B = {a.kind})")


if __name__ == "__main__":
    main()
