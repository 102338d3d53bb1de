"""Do the GPU speed settings change what the networks compute? Each setting against fp32 on the CPU.

    python bench/gpu_numerics.py                 # on a CUDA machine (a CPU-only machine checks the script)

For the shipped teachers and the LeNet-5-half student, at batch sizes 2, 3, 64 and 256, and under each of
fp32 / bf16 autocast x NCHW / channels-last x cudnn.benchmark off / on: the largest logit error relative to the
logits' spread, the share of argmaxes that agree with the CPU's, and the cosine between the student's KD gradient
and the CPU's. A setting that computes something else shows as an agreement far under 1 or a cosine far under 1
(bf16 alone costs about 1e-2 relative error and a cosine near 0.99). Prints one table.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dfkd.modelfile import load_model  # noqa: E402
from dfkd.models import create  # noqa: E402

TEACHERS = ("mnist_lenet5_bn.pt", "mnist_lenet5.pt", "cifar10_wrn16_1.pt")
BATCHES = (2, 3, 64, 256)


def _placed(module: torch.nn.Module, x: torch.Tensor, device: torch.device,
            channels_last: bool) -> tuple[torch.nn.Module, torch.Tensor]:
    """`module` and `x` on `device`, in channels-last memory format or the plain one."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return module.to(device).to(memory_format=fmt), x.to(device).contiguous(memory_format=fmt)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """The run's autocast for `dtype` (off for None), without the weight cache, as dfkd.precision enters it."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=False)


def outputs(model: torch.nn.Module, x: torch.Tensor, device: torch.device, dtype: torch.dtype | None,
            channels_last: bool) -> torch.Tensor:
    """`model`'s fp32 logits on `x`, computed on `device` under the setting."""
    m, xd = _placed(model, x, device, channels_last)
    with torch.no_grad(), _autocast(device, dtype):
        return m(xd).float().cpu()


def kd_grad(student: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, device: torch.device,
            dtype: torch.dtype | None, channels_last: bool) -> torch.Tensor:
    """The student's flattened gradient of KL(softmax(target/4) || softmax(s/4)) * 16 on `x` under the setting."""
    s, xd = _placed(student, x, device, channels_last)
    s.zero_grad()
    with _autocast(device, dtype):
        logits = s(xd)
    loss = F.kl_div(F.log_softmax(logits.float() / 4, 1), F.softmax(target.to(device) / 4, 1),
                    reduction="batchmean") * 16
    loss.backward()
    return torch.cat([p.grad.flatten().cpu() for p in s.parameters()])


def main() -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cpu = torch.device("cpu")
    rows = []
    for name in TEACHERS:
        teacher, meta = load_model(ROOT / "examples" / name)
        teacher.eval()
        spec = meta.input_spec
        student = create("lenet5_half", num_classes=meta.num_classes, in_channels=spec.channels,
                         input_size=spec.size) if spec.channels == 1 else None
        for batch in BATCHES:
            x = torch.randn(batch, spec.channels, spec.size, spec.size, generator=torch.Generator().manual_seed(batch))
            ref = outputs(teacher, x, cpu, None, False)
            grad_ref = kd_grad(student, x, ref, cpu, None, False) if student is not None else None
            for (prec, dtype), cl, bench in itertools.product((("fp32", None), ("bf16", torch.bfloat16)),
                                                              (False, True), (False, True)):
                torch.backends.cudnn.benchmark = bench
                out = outputs(teacher, x, device, dtype, cl)
                spread = (ref.max(1).values - ref.min(1).values).clamp(min=1e-6)
                err = ((out - ref).abs().max(1).values / spread).max().item()
                agree = (out.argmax(1) == ref.argmax(1)).float().mean().item()
                cos = float("nan")
                if student is not None and batch > 3:
                    g = kd_grad(student, x, ref, device, dtype, cl)
                    cos = F.cosine_similarity(g, grad_ref, dim=0).item()
                    student.to(cpu).to(memory_format=torch.contiguous_format)
                teacher.to(cpu).to(memory_format=torch.contiguous_format)
                rows.append((name, batch, prec, "channels-last" if cl else "NCHW", "on" if bench else "off",
                             err, agree, cos))
    torch.backends.cudnn.benchmark = False
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}\n")
    print("| teacher | batch | precision | layout | cudnn.benchmark | max logit error / spread | argmax agreement | "
          "student KD-gradient cosine |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]:.2e} | {r[6]:.3f} | {r[7]:.4f} |")
    bad = [r for r in rows if r[6] < 0.9 or (r[7] == r[7] and r[7] < 0.9)]
    print(f"\n{len(bad)} of {len(rows)} settings compute something else (agreement or cosine under 0.9)")
    return 1 if bad else 0


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    sys.exit(main())
