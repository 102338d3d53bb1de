"""Quantization-aware distillation (`dfkd distill --quantize int8`): a fake-quantized student, a real int8 file.

Every Conv2d and Linear of the student is swapped for a subclass that fake-quantizes its weights to int8 per
output channel (symmetric, as onnxruntime quantizes them) and its input activations to int8 per tensor (affine,
range from the current batch), with straight-through gradients (`torch.fake_quantize_per_channel_affine` /
`torch.fake_quantize_per_tensor_affine`: identity inside the range, zero outside). The student thus learns
weights that survive rounding to int8 while it is distilled against the teacher on the method's synthetic data.
At the end the float weights are saved as usual (student.pt) and quantized for real by the same onnxruntime path
as `dfkd quantize` (`dfkd.quantize`), its activation ranges calibrated on the run's own synthetic images.

Why this and not a library QAT flow: `torch.ao.quantization`'s eager/FX QAT is deprecated (torchao's PT2E flow
replaces it) and torchao is not a dependency; the fake-quant ops above are core PyTorch and public, and the
swapped modules keep the parameter names, so the state dict, checkpoints and resume are those of the float
student. Activation ranges are per batch (no observer state), so a resumed run is the run it would have been.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from dfkd.deploystats import DeployStats
    from dfkd.engine import Run

QUANT_BITS = ("int8",)


def _fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per output channel (range -127..127, zero point 0)."""
    amax = w.detach().abs().flatten(1).amax(1).clamp_min(1e-8)
    scale = (amax / 127.0).float()
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -127, 127)


def _fake_quant_activation(x: torch.Tensor) -> torch.Tensor:
    """Affine int8 per tensor over the batch's range (which always includes 0, as onnxruntime's does)."""
    lo = x.detach().min().clamp(max=0.0)
    hi = x.detach().max().clamp(min=0.0)
    scale = ((hi - lo) / 255.0).clamp_min(1e-8).reshape(1).float()
    zero = (-128 - torch.round(lo / scale)).clamp(-128, 127).to(torch.int32)
    return torch.fake_quantize_per_tensor_affine(x, scale, zero, -128, 127)


class FakeQuantConv2d(nn.Conv2d):
    """A Conv2d computing with int8-rounded weights and inputs (straight-through gradients)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(_fake_quant_activation(x), _fake_quant_weight(self.weight), self.bias)


class FakeQuantLinear(nn.Linear):
    """A Linear computing with int8-rounded weights and inputs (straight-through gradients)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_fake_quant_activation(x), _fake_quant_weight(self.weight), self.bias)


_SWAP = {nn.Conv2d: FakeQuantConv2d, nn.Linear: FakeQuantLinear}


def prepare_qat(model: nn.Module, bits: str = "int8") -> nn.Module:
    """Make `model` fake-quantized in place (same parameters, same state-dict keys) and return it.

    Raises:
        DfkdError: for a precision other than int8 (`--quantize`), or when onnx/onnxruntime are missing: the run
            checks before training that it can write its int8 file at the end.
    """
    from dfkd.export import require

    if bits not in QUANT_BITS:
        from dfkd.errors import DfkdError

        raise DfkdError(f"--quantize {bits}: unsupported; choose one of {', '.join(QUANT_BITS)}")
    require("onnx")
    require("onnxruntime.quantization")
    for m in model.modules():
        new = _SWAP.get(type(m))
        if new is not None:
            m.__class__ = new  # the same object: parameters, hooks and optimizer references stay valid
    return model


def strip_qat(model: nn.Module) -> nn.Module:
    """Undo `prepare_qat` in place: plain Conv2d/Linear again (for export)."""
    back = {v: k for k, v in _SWAP.items()}
    for m in model.modules():
        if type(m) in back:
            m.__class__ = back[type(m)]
    return model


def fake_quantized(model: nn.Module) -> bool:
    """True when `prepare_qat` has been applied to `model`."""
    return any(type(m) in (FakeQuantConv2d, FakeQuantLinear) for m in model.modules())


INT8_FILE = "student_int8.onnx"
CALIBRATION_IMAGES = 512


@torch.no_grad()
def method_images(method: object, num: int) -> torch.Tensor:
    """`num` synthetic images the method serves its student (its synthesizer's `sample`), on the CPU."""
    synth = getattr(method, "synth", None)
    data = getattr(method, "data", None)  # the transfer method's file
    if synth is None and hasattr(data, "images"):
        return data.images(torch.arange(min(num, len(data))), method.teacher.spec).float().cpu()
    if synth is None:
        last = getattr(method, "last_images", None)
        if last is None:
            from dfkd.errors import DfkdError

            raise DfkdError("--quantize: the method has no synthetic images to calibrate the int8 model on")
        return last.detach().float().cpu()[:num]
    batches, n = [], 0
    while n < num:
        batches.append(synth.sample(min(256, num - n)).detach().float().cpu())
        n += len(batches[-1])
    return torch.cat(batches)[:num]


def write_int8(run: Run) -> DeployStats:
    """After a `--quantize int8` run: the real int8 student (student_int8.onnx) and its numbers (deploy.json).

    The float weights the fake-quantized student learned are exported and quantized by onnxruntime (see
    `dfkd.quantize`), activation ranges calibrated on CALIBRATION_IMAGES of the method's synthetic images; float
    and int8 are then measured (`dfkd.deploystats`) on the run's --eval-data, with agreement against the teacher.

    Returns:
        The `DeployStats`, also saved as deploy.json in the run folder.
    """
    import copy
    import tempfile

    from dfkd.deploystats import DEPLOY_JSON, measure
    from dfkd.evaluate import predict
    from dfkd.methods.transfer import NoTeacher
    from dfkd.precision import eager
    from dfkd.quantize import quantize_model

    student = strip_qat(eager(copy.deepcopy(run.method.student))).cpu().eval()
    teacher, spec = run.teacher, run.teacher.spec
    calib = method_images(run.method, CALIBRATION_IMAGES)
    eval_data = run.eval_data
    t_logits = None
    if eval_data is not None and not isinstance(teacher, NoTeacher):
        t_logits = predict(teacher, eval_data, spec, run.device)
    with tempfile.TemporaryDirectory(prefix="dfkd-qat-") as work:
        q = quantize_model(student, spec, teacher.num_classes, calib, run.run_dir / INT8_FILE, work, force=True,
                           class_names=teacher.class_names)
        stats = measure(q.float_onnx, q.int8, spec, eval_data, t_logits,
                        f"{len(calib)} images of the run's synthetic data, minmax ranges")
    stats.save(run.run_dir / DEPLOY_JSON)
    return stats
