"""Several processes, one per GPU or machine: `torchrun --nproc-per-node N -m dfkd distill ...`.

torchrun starts N copies of dfkd and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `from_env`
joins them into one process group (NCCL for CUDA tensors, gloo for CPU ones). The run is data-parallel:

- Every rank builds the same student and generator from the run's seed, then reseeds its RNG with its own stream
  (`rank_seed`), so each rank draws its own noise and synthesizes (or reads) its own share of the global batch
  (`-p batch_size` is the global batch; dfkd.sources splits it and the stored data).
- Gradients are averaged explicitly: a step pre-hook on every optimizer of a shared network (student, adapters,
  GAN generator, Fast's meta generator, discriminator, online peer) all-reduces its gradients just before it steps.
  Not DistributedDataParallel: methods use the student in several roles a round (a frozen adversary in the
  generator's loss, teacher-side and student-side taps), toggle `requires_grad`, and step several optimizers;
  DDP would need `find_unused_parameters`, re-prefix every module path the taps are keyed by, and still leave the
  generators and discriminators unsynchronised. Networks made anew for each batch (CMI's generator, inverted
  pixels and latents) stay on their rank: they are that rank's synthesis.
- BatchNorm-statistics losses (DeepInversion, CMI, Fast, DFQ, ZeroQ, ADI) match the teacher's running statistics
  with the statistics of each rank's own batch, as the single-GPU methods do with theirs: the per-rank batch is the
  paper's batch divided by the number of ranks. The running BatchNorm buffers of the shared networks are averaged
  after every round, so every rank holds the same student.
- Rank 0 alone writes config.json, metrics.jsonl, TensorBoard, checkpoints and student.pt. A checkpoint holds
  every rank's RNG state, synthesizer state (its pool counts) and method state; each rank keeps its pool files in
  `rank<r>/` of the run folder (rank 0 in the folder itself).
- Stopping is agreed: after every round one all-reduce (max) of the round's seconds, a Ctrl-C/SIGTERM flag and a
  non-finite-loss flag, so every rank sees the same elapsed time, stops at the same round and none waits forever.
- A run resumes with the number of processes it was started with; another count is refused.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from dfkd.errors import DfkdError

T = TypeVar("T")
_GOLDEN = 0x9E3779B97F4A7C15


class OtherRankFailed(DfkdError):
    """Raised on the other ranks when rank 0 stopped with an error (rank 0 prints the error itself)."""



def resume_command(run_dir: object, world: int = 1, trust_pickle: bool = False) -> str:
    """The command that continues a run made by `world` processes (a resume must keep that count).

    A run whose teacher is a pickle needs `--trust-pickle` typed again: a checkpoint does not grant it.
    """
    launch = "dfkd" if world <= 1 else f"torchrun --nproc-per-node {world} -m dfkd"
    return f"{launch} distill --resume {shlex.quote(str(run_dir))}" + " --trust-pickle" * trust_pickle

@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank `rank` of `world` (rank 0 writes), its GPU `local_rank`."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    # --- agreement --------------------------------------------------------------------------------------------
    def agree(self, seconds: float, stop: bool, flag: bool) -> tuple[float, bool, bool]:
        """The longest round time, whether any rank was asked to stop, and whether any raised `flag`.

        `flag`: a non-finite loss, or a checkpoint due by this process's wall clock.
        """
        if not self.enabled:
            return seconds, stop, flag
        import torch.distributed as dist

        t = torch.tensor([seconds, float(stop), float(flag)], dtype=torch.float64)
        dist.all_reduce(t, dist.ReduceOp.MAX, group=_cpu_group())
        return float(t[0]), bool(t[1]), bool(t[2])

    def on_main(self, fn: Callable[[], T], share: bool = False) -> T | None:
        """Run `fn` on rank 0 alone; an error there is raised on every rank, so none waits for it forever.

        Returns:
            `fn`'s result on rank 0; on the other ranks the same result when `share` (it must pickle), else None.
        """
        if not self.enabled:
            return fn()
        import torch.distributed as dist

        box: list[Any] = [None]
        error: BaseException | None = None
        result = None
        if self.main:
            try:
                result = fn()
                box[0] = ("ok", result if share else None)
            except BaseException as e:  # noqa: BLE001 - handed to the other ranks, then raised again here
                error, box[0] = e, ("error", str(e) or type(e).__name__)
        dist.broadcast_object_list(box, src=0, group=_cpu_group())
        if error is not None:
            raise error
        if box[0][0] == "error":
            raise OtherRankFailed(f"rank 0 stopped: {box[0][1]}")
        return result if self.main else box[0][1]

    def on_every(self, fn: Callable[[], T], undo: Callable[[T], None] | None = None) -> T:
        """Run `fn` on every rank; when it raised on any, every rank stops before the next collective.

        A check only one rank can make (its own pool files, say) failed there while rank 0 went on into a collective
        and died with a gloo "Connection closed by peer" traceback. Rank 0 says which rank stopped and why (the
        others stay silent, as they do after rank 0's own errors); `undo` releases what `fn` made on the ranks where
        it succeeded.
        """
        if not self.enabled:
            return fn()
        import torch.distributed as dist

        result, error = None, None
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - told to every rank, then raised again
            error = e
        told: list[Any] = [None] * self.world
        dist.all_gather_object(told, None if error is None else (str(error) or type(error).__name__),
                               group=_cpu_group())
        failed = [(r, m) for r, m in enumerate(told) if m is not None]
        if not failed:
            return result
        if error is None and undo is not None:
            undo(result)
        if error is not None and (self.main or not isinstance(error, DfkdError)):
            raise error
        if self.main:
            raise DfkdError(f"rank {failed[0][0]} stopped: {failed[0][1]}")
        raise OtherRankFailed(f"rank {failed[0][0]} stopped: {failed[0][1]}") from error

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` (tensors moved to the CPU), as a list on rank 0; None elsewhere."""
        obj = to_cpu(obj)
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0, group=_cpu_group())
        return out

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier(group=_cpu_group())

    # --- shared networks --------------------------------------------------------------------------------------
    def share(self, method: Any) -> None:
        """Make `method`'s shared networks equal to rank 0's and keep them equal (gradient averaging hooks)."""
        if not self.enabled:
            return
        for module in shared_modules(method):
            broadcast_module(module)
        for opt in shared_optimizers(method):
            opt.register_step_pre_hook(lambda o, args, kwargs: average_gradients(_params(o), self.world))
        reset = getattr(method.synth, "reset_first_block", None)
        if reset is not None:  # Fast's re-initialisation draws on each rank's own stream: rank 0's wins

            def reset_on_every_rank() -> None:
                reset()
                broadcast_module(method.synth.generator)

            method.synth.reset_first_block = reset_on_every_rank

    def sync_buffers(self, method: Any) -> None:
        """Average the shared networks' floating-point buffers (BatchNorm running statistics) across ranks."""
        if self.enabled:
            average_tensors([b for m in shared_modules(method) for b in m.buffers() if b.is_floating_point()],
                            self.world)


SINGLE = Dist()
_GROUP: dict[str, Any] = {}


def _cpu_group() -> Any:
    """A gloo group for small CPU messages (flags, objects), whatever backend carries the tensors."""
    import torch.distributed as dist

    if "cpu" not in _GROUP:
        _GROUP["cpu"] = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return _GROUP["cpu"]


def env_world() -> int:
    """WORLD_SIZE as torchrun sets it (1 when dfkd runs on its own)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise DfkdError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r}: not a number; start dfkd with torchrun") from None


def under_torchrun() -> bool:
    """Started by torchrun's agent (it sets TORCHELASTIC_RUN_ID for its processes)."""
    return bool(os.environ.get("TORCHELASTIC_RUN_ID"))


def env_rank() -> int:
    """RANK as torchrun sets it (0 when dfkd runs on its own, or the value is not a number)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def quiet_rank() -> bool:
    """Whether this process is a torchrun rank other than 0, which leaves the talking to rank 0.

    RANK alone is no job of several: a batch system may set it for a single process, which must still speak.
    """
    return env_rank() > 0 and env_world() > 1


def from_env(device: str = "auto", timeout_minutes: float = 30.0) -> Dist:
    """Join the job torchrun started (a no-op `Dist` of one rank without torchrun's environment)."""
    world = env_world()
    if world <= 1:
        return SINGLE
    import torch.distributed as dist

    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = device != "cpu" and torch.cuda.is_available()
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout_minutes))
        _GROUP.clear()
    return Dist(rank, world, local)


@contextmanager
def joined(device: str = "auto") -> Iterator[Dist]:
    """`from_env` for the length of a run: the process group it made is left cleanly at the end.

    After a normal end every rank waits for the others (so none tears the connections down while another is still
    sending), then the group is destroyed; after an error it is destroyed at once.
    """
    import torch.distributed as dist

    made = env_world() > 1 and not dist.is_initialized()
    d = from_env(device)
    try:
        yield d
        if made:
            d.barrier()
    finally:
        if made and dist.is_initialized():
            dist.destroy_process_group()
            _GROUP.clear()


def rank_device(name: str, d: Dist) -> str:
    """The device name of this rank: `cuda`/`auto` become the rank's own GPU (LOCAL_RANK) under torchrun."""
    if not d.enabled:
        return name
    if name.startswith("cuda:"):
        raise DfkdError(f"--device {name}: under torchrun every process takes the GPU of its LOCAL_RANK; give "
                        "--device cuda (or auto)")
    if name in ("cuda", "auto") and torch.cuda.is_available():
        if d.local_rank >= torch.cuda.device_count():
            raise DfkdError(f"LOCAL_RANK {d.local_rank}: this machine has {torch.cuda.device_count()} GPU(s); start "
                            "at most that many processes per node (--nproc-per-node)")
        torch.cuda.set_device(d.local_rank)
        return f"cuda:{d.local_rank}"
    return name


def rank_seed(seed: int, rank: int) -> int:
    """Rank `rank`'s own seed, far from every other rank's (rank 0 keeps a different stream than a 1-process run)."""
    return (seed + (rank + 1) * _GOLDEN) % 2**63


def to_cpu(obj: Any) -> Any:
    """`obj` with every tensor in it copied to the CPU (dicts, lists and tuples walked)."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


# --- what is shared -------------------------------------------------------------------------------------------
def shared_optimizers(method: Any) -> list[torch.optim.Optimizer]:
    """The optimizers of the networks every rank keeps equal.

    They are the student's, those under the run's schedule (a GAN generator, the online peer), Fast's meta
    generator and the objectives' own (a discriminator).
    """
    opts = [opt for opt, _ in method._base_lrs]
    meta = getattr(method.synth, "meta_optimizer", None)
    opts += [meta] if meta is not None else []
    opts += [d.opt for d in _discriminators(method)]
    return list({id(o): o for o in opts}.values())


def _discriminators(method: Any) -> list[Any]:
    """The critics of adversarial objectives (`--discriminator`) and of the online method (each with net, opt)."""
    found = [getattr(o, "disc", None) for o in method.objectives] + list(getattr(method, "discs", []))
    return [d for d in found if isinstance(getattr(d, "opt", None), torch.optim.Optimizer)]


def shared_modules(method: Any) -> list[nn.Module]:
    """The networks whose parameters the shared optimizers train, plus the student (for its buffers)."""
    params = {id(p) for opt in shared_optimizers(method) for p in _params(opt)}
    candidates = [method.student, getattr(method.synth, "generator", None), getattr(method, "peer", None),
                  *(d.net for d in _discriminators(method))]
    out = [m for m in candidates if isinstance(m, nn.Module)
           and (m is method.student or any(id(p) in params for p in m.parameters()))]
    return list({id(m): m for m in out}.values())


def _params(opt: torch.optim.Optimizer) -> list[Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


# --- collectives on many tensors ------------------------------------------------------------------------------
def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers into `module` on every rank."""
    import torch.distributed as dist

    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def average_tensors(tensors: Iterable[Tensor], world: int) -> None:
    """Replace each tensor by its mean over the ranks, one all-reduce per (device, dtype)."""
    import torch.distributed as dist

    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    with torch.no_grad():
        for ts in groups.values():
            flat = torch.cat([t.reshape(-1) for t in ts])
            dist.all_reduce(flat)
            flat.div_(world)
            for t, part in zip(ts, flat.split([t.numel() for t in ts])):
                t.copy_(part.view_as(t))


def average_gradients(params: list[Tensor], world: int) -> None:
    """Average the gradients of `params` over the ranks.

    A parameter without a gradient is skipped: every rank runs the same code on batches of the same shape, so the
    same parameters have gradients on every rank (checking would cost a collective and a host sync every step).
    """
    average_tensors([p.grad for p in params if p.grad is not None], world)
