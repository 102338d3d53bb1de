"""How close one round of a method runs to the compute limit: two ratios, printed as one JSON line.

    python bench/overhead.py TEACHER.pt METHOD

- `bare_ratio`: wall time of a round / the bare forward (and backward) time of the same networks at the same
  batch sizes. Every call of a network during a round is recorded (input shape, grad mode, whether the output was
  differentiable); the calls are then replayed on random inputs of those shapes with nothing around them. What the
  ratio counts beyond 1 is everything else the method does: losses, augmentation, optimiser steps, Python.
- `op_ratio`: wall time of a round / time inside top-level PyTorch operators (torch.profiler): the Python and
  framework share only, whatever the operators compute.

Inner loops (`iterations`, `g_steps`, ...) are cut to 10: the same networks at the same batch sizes, fewer
repeats, so the profiler's pass stays short.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from dfkd.methods import get_method
from dfkd.students import build_student, student_arch
from dfkd.teacher import Teacher, load_teacher

INNER_LOOPS = ("iterations", "di_iters", "g_steps", "s_steps")


@dataclass
class Call:
    """One network call seen during a round."""

    net: nn.Module
    shape: tuple[int, ...]
    input_grad: bool  # the input was differentiable (pixels being optimised, generator output)
    grad: bool  # autograd was on
    backward: bool  # the output was differentiable, so a backward went through the network
    weights_grad: bool  # the network's parameters took gradients (False for a frozen teacher or student)


def networks(method: object) -> list[nn.Module]:
    """The method's top-level networks: teacher(s), student(s), generator, critics, adapters (not augmentation)."""
    found: dict[int, nn.Module] = {}

    def visit(obj: object, depth: int) -> None:
        if isinstance(obj, Teacher):
            members = getattr(obj, "members", None) or [obj]
            for t in members:
                found[id(t.module)] = t.module
        elif isinstance(obj, nn.Module):
            if any(True for _ in obj.parameters()):
                found[id(obj)] = obj
        elif depth < 3 and isinstance(obj, (list, tuple)):
            for o in obj:
                visit(o, depth + 1)
        elif depth < 3 and hasattr(obj, "__dict__") and type(obj).__module__.startswith(("dfkd", "generators")):
            for o in vars(obj).values():
                visit(o, depth + 1)

    visit(method, 0)
    inner = {id(sub) for net in found.values() for sub in net.modules() if sub is not net}
    return [net for key, net in found.items() if key not in inner]


class Recorder:
    """Logs every call of `nets` while `active`.

    Zoo models are followed through `forward_features`, which their forward and the teacher's
    `forward_with_features` (DAFL, feature objectives) both go through; other networks through a forward hook.
    Clones made during a round (Fast's inner generator) carry the hook along and outlive `remove()`; turning
    `active` off silences them too.
    """

    def __init__(self, nets: list[nn.Module]) -> None:
        self.calls: list[Call] = []
        self.active = True
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.patched: list[nn.Module] = []

        def log(net: nn.Module, x: object, out: object) -> None:
            if not self.active or not isinstance(x, torch.Tensor):
                return
            y = out[0] if isinstance(out, (tuple, list)) else out
            self.calls.append(Call(net, tuple(x.shape), x.requires_grad, torch.is_grad_enabled(),
                                   isinstance(y, torch.Tensor) and y.requires_grad,
                                   any(p.requires_grad for p in net.parameters())))

        def hook(module: nn.Module, args: tuple, out: object) -> None:
            # A closure, not a bound method: deepcopy shares a function but would copy a method's Recorder.
            log(module, args[0] if args else None, out)

        for net in nets:
            if callable(getattr(type(net), "forward_features", None)):
                def features(x: torch.Tensor, *args: object, _net: nn.Module = net,
                             _orig: Callable = net.forward_features, **kwargs: object) -> object:
                    out = _orig(x, *args, **kwargs)
                    log(_net, x, out)
                    return out

                net.forward_features = features
                self.patched.append(net)
            else:
                self.handles.append(net.register_forward_hook(hook))

    def remove(self) -> None:
        self.active = False
        for h in self.handles:
            h.remove()
        for net in self.patched:
            del net.forward_features


def replay(calls: list[Call], device: torch.device) -> float:
    """Seconds to run `calls` bare: the same forwards (and backwards) on random inputs, nothing else."""
    params = {id(c.net): [(p, p.requires_grad) for p in c.net.parameters()] for c in calls}
    start = time.perf_counter()
    for c in calls:
        for p, _ in params[id(c.net)]:
            p.requires_grad_(c.weights_grad)
        with torch.set_grad_enabled(c.grad):
            x = torch.randn(c.shape, device=device, requires_grad=c.input_grad and c.grad)
            y = c.net(x)
            y = y[0] if isinstance(y, (tuple, list)) else y
            if c.backward:
                y.backward(torch.randn_like(y))  # a dense gradient, as a loss gives (sum()'s is a stride-0 view)
    elapsed = time.perf_counter() - start
    for ps in params.values():
        for p, flag in ps:
            p.requires_grad_(flag)
    return elapsed


def measure(teacher_file: str, method: str, repeats: int = 3) -> dict[str, float]:
    """Both ratios for one round of `method` on the teacher in `teacher_file` (CPU)."""
    device = torch.device("cpu")
    teacher = load_teacher(teacher_file)
    cls = get_method(method)
    p = cls.default_params(teacher)
    p.update({k: min(p[k], 10) for k in INNER_LOOPS if k in p})
    name, kw = student_arch(teacher, None)
    m = cls(teacher, build_student(name, kw), p, device)
    m.round()  # warm-up: allocations, lazy state, the first batch of a pool
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        m.round()
        walls.append(time.perf_counter() - t0)
    wall = statistics.median(walls)

    recorder = Recorder(networks(m))
    m.round()
    recorder.remove()
    calls = recorder.calls
    replay(calls, device)  # warm-up
    bare = statistics.median(replay(calls, device) for _ in range(repeats))

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        m.round()
        profiled = time.perf_counter() - t0
    ops = sum(e.cpu_time_total for e in prof.events() if e.cpu_parent is None and
              (e.name.startswith(("aten::", "autograd::")) or "Backward" in e.name)) / 1e6
    return {"round_s": round(wall, 4), "bare_s": round(bare, 4), "calls": len(calls),
            "bare_ratio": round(wall / bare, 2) if bare else None,
            "op_ratio": round(profiled / ops, 2) if ops else None}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("teacher", help="a teacher file dfkd loads without options (a dfkd model file)")
    ap.add_argument("method", help="a method name (dfkd methods)")
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    print(json.dumps(measure(a.teacher, a.method)))
