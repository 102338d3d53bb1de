"""What the zoo's CPU max-pool saves: a LeNet-5 forward and a LeNet-5-half KD step, library pool against MaxPool2.

    OMP_NUM_THREADS=1 python bench/pool.py [--batch 128] [--repeats 200]

One thread (as the CPU benchmarks run), batch 128 of 1x32x32 images (the CPU recipes' student batch). "library"
swaps every `MaxPool2` back to `nn.MaxPool2d(2)` and runs the identity adaptive pool LeNet used to run; "dfkd" is
the zoo as it is. Prints a Markdown table of milliseconds per call (median of five timings).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.models import create
from dfkd.models._base import MaxPool2


def _library(model: nn.Module) -> nn.Module:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MaxPool2):
                setattr(parent, name, nn.MaxPool2d(2))
    if hasattr(model, "pool"):  # LeNet's adaptive pool, an identity at 32 px that it used to run anyway
        features = model.forward_features

        def run_pool(x: torch.Tensor, _f: Callable = features) -> torch.Tensor:
            model.pool(torch.zeros(x.shape[0], model.stage2[0].out_channels, 5, 5))
            return _f(x)

        model.forward_features = run_pool  # type: ignore[method-assign]
    return model


def _ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(repeats // 5):
            fn()
        times.append((time.perf_counter() - t0) / (repeats // 5) * 1e3)
    return statistics.median(times)


def _kd_step(teacher: nn.Module, student: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        with torch.no_grad():
            t = teacher(x)
        loss = F.kl_div(F.log_softmax(student(x) / 20, 1), F.softmax(t / 20, 1), reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def main(argv: list[str] | None = None) -> list[tuple[str, float, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    x = torch.rand(args.batch, 1, 32, 32)
    rows = []
    for label, make in (("library", _library), ("dfkd", lambda m: m)):
        teacher = make(create("lenet5", 10, 1, 32)).eval()
        student = make(create("lenet5_half", 10, 1, 32))

        def forward(t: nn.Module = teacher) -> None:
            with torch.no_grad():
                t(x)

        rows.append((label, _ms(forward, args.repeats), _ms(_kd_step(teacher, student, x), args.repeats)))
    print(f"threads {torch.get_num_threads()}, batch {args.batch}, torch {torch.__version__}\n")
    print("| pool | LeNet-5 forward (ms) | LeNet-5-half KD step (ms) |\n|---|---|---|")
    for label, fwd, step in rows:
        print(f"| {label} | {fwd:.2f} | {step:.2f} |")
    return rows


if __name__ == "__main__":
    main()
