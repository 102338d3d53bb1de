"""What a network costs: multiply-adds of one image's forward pass, and how a run prints the count.

The recipes (`dfkd.methods._recipes`), the default student's cost bound (`dfkd.students`), `--method auto`'s
profile and `--precision auto` all read a network's cost here. The count is torch's FLOP counter on one zero image
(`torch.utils.flop_counter.FlopCounterMode`, halved: one multiply-add is two FLOPs); a network the counter cannot
see into (a TorchScript archive) has no count (None), and each caller says what it does then.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from dfkd.spec import InputSpec

_MACS: weakref.WeakKeyDictionary[Any, int | None] = weakref.WeakKeyDictionary()


def count_macs(model: Any, spec: InputSpec) -> int | None:
    """Multiply-adds of `model` on one zero image of `spec` (None where torch's FLOP counter cannot see in)."""
    device = next((q.device for q in model.parameters()), torch.device("cpu"))
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()  # BatchNorm's running statistics must not move
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(spec.shape(1), device=device))
        return int(counter.get_total_flops()) // 2
    except Exception:  # noqa: BLE001 - an exported or scripted teacher the counter cannot see into: no count
        return None
    finally:
        if was_training:
            model.train()


def multiply_adds(teacher: Any) -> int | None:
    """Multiply-adds of the teacher's forward pass on one image of its spec (None where it cannot be counted).

    Counted once per teacher (a forward pass of one zero image, without gradients) and remembered.
    """
    if teacher in _MACS:
        return _MACS[teacher]
    macs = count_macs(teacher, teacher.spec)
    _MACS[teacher] = macs
    return macs


def millions(macs: int | None) -> str:
    """A multiply-add count as the run prints it: "0.417M", "101M", "11.3G" ("?" where it could not be counted)."""
    if macs is None:
        return "?"
    return f"{macs / 1e9:.3g}G" if macs >= 999.5e6 else f"{macs / 1e6:.3g}M"
