"""Speed: mixed precision, channels-last, torch.compile and cudnn.benchmark for one run.

`--precision fp32|bf16|fp16|auto` (auto: fp32 on a GPU, where cuDNN runs fp32 convolutions in TF32, the note above
PRECISIONS says why; on a CPU with a native bf16 unit (`cpu_bf16`: Intel AMX, AVX-512 BF16) bf16 for a heavy
teacher, past the CPU recipes' multiply-add line, fp32 otherwise). Channels-last applies to convolutional networks
on a GPU, and on a CPU under bf16, where oneDNN's bf16 convolutions want it. bf16 and fp16 run each round under
`torch.autocast`; the weights, optimiser states and the losses that match BatchNorm statistics or distil logits stay
in fp32 (those losses cast their inputs with `.float()`). fp16 adds a dynamic loss scale (`torch.amp.GradScaler`);
its finite check reads one flag per optimiser step back to the host, so fp16 costs one sync a step where bf16 costs
none. `--compile` compiles the teacher, the student and the generator with `torch.compile`; a network that fails to
compile prints one warning line and runs eagerly from then on.

`--deterministic` makes a GPU run reproducible: deterministic cuDNN convolutions and torch's deterministic
algorithms (`torch.use_deterministic_algorithms`, warn-only: an op with no deterministic CUDA kernel warns and runs
as it is), no cudnn.benchmark, and cuBLAS's fixed workspace (`CUBLAS_WORKSPACE_CONFIG`, set before the run's first
GPU matrix product). Without it, cuDNN and cuBLAS may pick kernels that sum in another order from run to run, so two
GPU runs of one seed, or a run and its resume, drift apart by rounding (their checkpoints hold the same state
either way). A CPU run is reproducible with or without it, but for a rare process: on a 2-core Intel Xeon about
one process in 60 took another rounding path in torch's CPU kernels from its first round on (a tanh of the same
input came out different; the cause was not found, and neither MKL's dynamic threading, its CNR mode, the thread
count, the CPU a process starts on nor the hash seed explains it), and then ended about 1e-2 apart in its weights.
The flags are the run's: they are put back when it ends.

Synthesizers and methods step their optimisers through `backward(loss)` and `step(*optimizers)`, which apply the
run's loss scale when there is one and are plain `loss.backward()` / `opt.step()` otherwise.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfkd.errors import DfkdError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Why `auto` is fp32 on a GPU too, as measured on an H200 (2026-12-04, torch 2.11): cuDNN runs fp32 convolutions
# in TF32 there, so bf16 was no faster on the papers' ResNet-34 -> ResNet-18 pair (fast 7,775 against 10,845
# images/s, DFQ 11,128 / 12,768, DeepInversion 8,125 / 10,583; it halves GPU memory). `--precision bf16` remains
# for memory; its logits and KD gradients matched the CPU's in every layout (bench/gpu_numerics.py).
# On a CPU, measured on this project's bench machine (2 cores with AMX, 2026-12-06, torch 2.14, one thread): a
# KD step of a WRN-16-2 teacher and WRN-16-1 student at batch 128 took 2.2x less CPU time in bf16 than fp32, 2.8x
# with channels-last; a LeNet-5 pair 1.1-1.2x. So `auto` takes bf16 on such a CPU for heavy teachers only (past
# `dfkd.methods._recipes.CPU_TEACHER_MACS`), where the gain is large; what it does to accuracy (twice the steps in
# a CPU budget, e.g. DFQ on a WRN-16-2 at 5 CPU-minutes 76.1 -> 93.6 % of the teacher):
# docs/cross-teacher-history.md, "Twenty-fourth session".
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: The CPU flags of a native bf16 unit (Intel AMX on Sapphire Rapids and later, AVX-512 BF16 on Cooper Lake and
#: AMD Zen 4 and later); without one, bf16 on a CPU is emulated and slower than fp32.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")

#: The loss scale of the run in progress (fp16 only); None: plain backward and step.
_scaler: torch.amp.GradScaler | None = None
_pending = False  # an optimiser stepped under the scale since its last update


@functools.cache
def cpu_bf16() -> str | None:
    """The flag by which this CPU computes bf16 natively (`BF16_CPU_FLAGS`), or None (none, or not Linux)."""
    try:
        return bf16_flag(Path("/proc/cpuinfo").read_text())
    except OSError:
        return None


def bf16_flag(cpuinfo: str) -> str | None:
    """The first of `BF16_CPU_FLAGS` in the first "flags" line of a /proc/cpuinfo text, or None."""
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return next((f for f in BF16_CPU_FLAGS if f in flags), None)


def auto_bf16_line(network: str, macs: str) -> str:
    """What a run says when `auto` chose bf16 on this CPU for its `network` ("teacher", "model") of `macs`."""
    return (f"precision: bf16 (auto: this CPU computes bf16 natively, flag {cpu_bf16()}, and the {network} costs "
            f"{macs} multiply-adds an input; --precision fp32 keeps fp32)")


def resolve_precision(name: str, device: torch.device, world: int = 1, heavy: bool = False) -> str:
    """`auto` made concrete for `device` and the teacher; an explicit choice the device cannot run is a DfkdError.

    `auto` is bf16 on a CPU with a native bf16 unit for a `heavy` teacher, fp32 otherwise.

    fp16 is refused for a job of several processes: its loss scaler may skip an optimizer step on one process
    (an inf in that process's gradients) while the others take it, and their gradient averaging would then wait
    forever. bf16 needs no scaler.

    Args:
        name: auto, fp32, bf16 or fp16.
        device: where the run computes.
        world: processes in the job (torchrun).
        heavy: the teacher costs more multiply-adds an input than the CPU recipes' line (`dfkd.methods._recipes`).

    Returns:
        fp32, bf16 or fp16.
    """
    if name not in PRECISIONS:
        raise DfkdError(f"--precision {name}: use one of {', '.join(PRECISIONS)}")
    if name == "fp16" and world > 1:
        raise DfkdError(f"--precision fp16 with {world} processes: its loss scaling can skip a step on one process "
                        "and not the others; use --precision bf16 (or fp32) under torchrun")
    if name == "auto":  # bf16 is opt-in on a GPU: see the note above PRECISIONS
        return "bf16" if device.type == "cpu" and heavy and cpu_bf16() else "fp32"
    if name != "fp32" and device.type not in ("cuda", "cpu"):
        raise DfkdError(f"--precision {name}: mixed precision runs on cuda or cpu, not {device.type}; "
                        "use --precision fp32")
    if name == "fp16" and device.type == "cpu":  # it ran, 11x slower, without a word
        warnings.warn("--precision fp16 on a CPU: float16 has no fast path there (a WRN-16-1 step at batch 64 on an "
                      "AMD EPYC: 3.0 s, against 0.26 s in fp32 and 0.13 s in bf16); use --precision auto, bf16 or "
                      "fp32", stacklevel=2)
    return name


class Precision:
    """The numeric settings of one run: autocast dtype, loss scaling, memory format, compilation.

    Args:
        name: fp32, bf16 or fp16 (see `resolve_precision`).
        device: where the run computes.
        compile: compile the networks with `torch.compile` in `prepare`.
        deterministic: reproducible kernels from `prepare` until `restore` (see the module docstring).
    """

    def __init__(self, name: str, device: torch.device, compile: bool = False, deterministic: bool = False) -> None:
        self.name, self.device, self.compile, self.deterministic = name, device, compile, deterministic
        self.dtype = _DTYPES.get(name)
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None
        self._saved: tuple[bool, bool, bool, bool] | None = None  # the global flags before `prepare`

    @contextmanager
    def autocast(self) -> Iterator[None]:
        """The context one round runs in: autocast to the run's dtype, and its loss scale in force."""
        global _scaler
        old, _scaler = _scaler, self.scaler
        try:
            if self.dtype is None:
                yield
            else:
                # cache_enabled=False: autocast caches the low-precision copy of every fp32 leaf (weights, and the
                # images and latents the inversion methods optimise) until its context exits, and a round steps
                # optimisers inside it, so with the cache every forward after the first would see stale values.
                with torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=False):
                    yield
        finally:
            _flush()
            _scaler = old

    def after_round(self, method: Any) -> None:
        """The round's last synthetic batch in fp32 (under autocast a generator makes bf16/fp16 images)."""
        x = getattr(method, "last_images", None)
        if self.dtype is not None and x is not None and x.dtype == self.dtype:
            method.last_images = x.float()

    def prepare(self, modules: dict[str, nn.Module]) -> None:
        """Channels-last for convolutional networks (on a GPU, or bf16 on a CPU), cudnn.benchmark, `--compile`.

        Args:
            modules: the run's networks by name (teacher, student, generator), changed in place: parameters and
                state_dict keys stay as they are, so checkpoints do not depend on these settings.
        """
        cudnn = torch.backends.cudnn
        self._saved = (cudnn.benchmark, cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
                       torch.is_deterministic_algorithms_warn_only_enabled())
        if self.deterministic:
            deterministic_env()
            cudnn.benchmark, cudnn.deterministic = False, True
            torch.use_deterministic_algorithms(True, warn_only=True)
        if self.device.type == "cuda":
            cudnn.benchmark = not self.deterministic
        if self.device.type == "cuda" or self.dtype is torch.bfloat16:
            for m in modules.values():
                if _has_conv(m) and not isinstance(m, torch.jit.ScriptModule):
                    m.to(memory_format=torch.channels_last)
        if self.compile:
            for name, m in modules.items():
                compile_in_place(m, name)

    def restore(self) -> None:
        """Put back the cuDNN and deterministic-algorithm flags `prepare` found (they are process-wide)."""
        if self._saved is not None:
            cudnn = torch.backends.cudnn
            cudnn.benchmark, cudnn.deterministic, algorithms, warn_only = self._saved
            torch.use_deterministic_algorithms(algorithms, warn_only=warn_only)
            self._saved = None

    def state_dict(self) -> dict[str, Any]:
        return {} if self.scaler is None else {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def deterministic_env() -> None:
    """Set the reproducible cuBLAS workspace (unless the user set one): read when a process first uses cuBLAS."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in module.modules())


def compile_in_place(module: nn.Module, name: str) -> None:
    """`torch.compile` `module`'s call, keeping its parameters and state_dict keys; eager again if it fails.

    Compilation happens at the first call (and again for new shapes); an error there prints one warning line
    naming the network and the error, and the module runs eagerly from then on. A deep copy of the module (the
    student EMA, a selected snapshot) runs eagerly: see `eager`.
    """
    compiled = torch.compile(module._call_impl)

    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any compiler failure: fall back, once, with a warning
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            print(f"warning: --compile: the {name} did not compile ({type(e).__name__}: {first}); "
                  "it runs eagerly", file=sys.stderr, flush=True)
            module._compiled_call_impl = None
            return module._call_impl(*args, **kwargs)

    module._compiled_call_impl = guarded


def eager(module: nn.Module) -> nn.Module:
    """`module` (a deep copy of a compiled one) made to run its own forward, not the original's compiled one."""
    for m in module.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    return module


def backward(loss: torch.Tensor) -> None:
    """`loss.backward()`, scaled by the run's fp16 loss scale when there is one.

    The loss scale is updated here, before the next backward, once the optimisers of the previous backward have
    stepped: optimisers stepped after one backward (CMI's head and generator) all see the same scale.
    """
    global _pending
    if _scaler is None:
        loss.backward()
        return
    if _pending:
        _scaler.update()
        _pending = False
    _scaler.scale(loss).backward()


def unscale(optimizer: torch.optim.Optimizer) -> None:
    """Bring `optimizer`'s gradients to their true scale before clipping or copying them (no-op without a scale)."""
    if _scaler is not None:
        _scaler.unscale_(optimizer)


def step(*optimizers: torch.optim.Optimizer) -> None:
    """Step each optimizer; under fp16 a step whose gradients are not finite is skipped (and the scale lowered)."""
    global _pending
    if _scaler is None:
        for opt in optimizers:
            opt.step()
        return
    for opt in optimizers:
        _scaler.step(opt)
    _pending = True


def fp32(t: torch.Tensor) -> torch.Tensor:
    """`t` in fp32 when it is bf16/fp16 (what autocast makes); any other dtype (fp64 in gradchecks) as it is."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def loss_scaled() -> bool:
    """Whether backward passes now run under an fp16 loss scale."""
    return _scaler is not None


def _flush() -> None:
    global _pending
    if _scaler is not None and _pending:
        _scaler.update()
    _pending = False


def run_networks(method: Any) -> dict[str, nn.Module]:
    """The networks of a method that `Precision.prepare` touches: teacher, student and generator (when any)."""
    nets: dict[str, nn.Module] = {"student": method.student}
    if isinstance(method.teacher, nn.Module) and any(True for _ in method.teacher.parameters()):
        nets["teacher"] = method.teacher
    generator = getattr(getattr(method, "synth", None), "generator", None)
    if isinstance(generator, nn.Module):
        nets["generator"] = generator
    return nets
