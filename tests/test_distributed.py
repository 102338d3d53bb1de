"""Several processes (dfkd.distributed): 2 ranks on the CPU with gloo, as torchrun would start them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from dfkd.config import DistillConfig
from dfkd.engine import Run, distill, resume
from dfkd.errors import DfkdError
from dfkd.methods import get_method

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_env(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _trouble_on_rank_1(rank: int, trouble: str | None, method: str) -> None:
    """On rank 1 only, from its third round: a non-finite loss ("nan"), or a Ctrl-C ("sigint")."""
    if rank != 1 or trouble is None:
        return
    cls = get_method(method)
    original, calls = cls.round, {"n": 0}

    def round_(self: Any) -> dict[str, float]:
        logs = original(self)
        calls["n"] += 1
        if calls["n"] >= 3 and trouble == "nan":
            logs = {**logs, "student/total": float("nan")}
        if calls["n"] == 3 and trouble == "sigint":
            os.kill(os.getpid(), signal.SIGINT)
        return logs

    cls.round = round_  # type: ignore[method-assign]


def _worker(rank: int, world: int, port: int, cfg: dict[str, Any], out: str, trouble: str | None = None) -> None:
    """One rank: distill (or resume {"resume": RUN_DIR}), then save what this rank ended with."""
    import torch.distributed as dist

    _rank_env(rank, world, port)
    torch.set_num_threads(1)
    _trouble_on_rank_1(rank, trouble, cfg.get("method", ""))
    seen: dict[str, Any] = {}
    original = Run.finish

    def finish(self: Run, log: Any, result: Any) -> Any:
        synth = self.method.synth
        seen.update(student=self.method.student.state_dict(), batch=int(self.method.p["batch_size"]),
                    generator=getattr(synth, "generator", torch.nn.Identity()).state_dict(),
                    last=self.method.last_images.clone(), dir=str(self.run_dir))
        return original(self, log, result)

    Run.finish = finish  # type: ignore[method-assign]
    try:
        result = resume(cfg["resume"], steps=cfg.get("steps")) if "resume" in cfg else \
            distill(DistillConfig.from_dict(cfg))
        seen["rank"] = result.rank
    except DfkdError as e:
        seen["error"] = f"{type(e).__name__}: {e}"
    finally:
        torch.save(seen, Path(out) / f"rank{rank}.pt")
        Run.finish = original  # type: ignore[method-assign]
    assert not dist.is_initialized(), "the run leaves its process group"


def run_two(cfg: dict[str, Any], out: Path, trouble: str | None = None) -> list[dict[str, Any]]:
    """Run `cfg` on 2 forked ranks (spawned ones on a GPU machine); what each rank ended with.

    Forking is much faster, but on a machine with a GPU the first backward (an earlier test's, even on the CPU)
    starts autograd's device threads, and a process with those threads cannot fork.
    """
    import torch.utils.tensorboard  # noqa: F401 - imported once here, not in each forked rank

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # the same for the optimizers' lazy imports
    how = "spawn" if torch.cuda.is_available() else "fork"
    mp.start_processes(_worker, args=(2, _free_port(), cfg, str(out), trouble), nprocs=2, start_method=how)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _config(method: str, tmp_path: Path, teacher_file: str, **extra: Any) -> dict[str, Any]:
    params = {**get_method(method).quick, "batch_size": 8}
    return {"teachers": [teacher_file], "method": method, "steps": 6, "out": str(tmp_path / "run"), "fid_every": 0,
            "ckpt_every": 4, "log_every": 1, "image_every": 1000, "device": "cpu", "params": params, **extra}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["dfad", "fast", "kd"])
def test_two_ranks_finish_with_identical_students(method: str, teacher_file: str, eval_npz: str,
                                                  tmp_path: Path) -> None:
    extra = {"data": eval_npz} if method == "kd" else {}
    r0, r1 = run_two(_config(method, tmp_path, teacher_file, **extra), tmp_path)
    assert _same(r0["student"], r1["student"]), "every rank ends with the same student (weights and BN buffers)"
    assert _same(r0["generator"], r1["generator"]), "a persistent generator is shared too"
    assert r0["batch"] == r1["batch"] == 4, "each rank makes half of the global batch of 8"
    assert not torch.equal(r0["last"], r1["last"]), "each rank draws its own noise / reads its own data"
    assert (r0["rank"], r1["rank"]) == (0, 1)
    run = tmp_path / "run"
    assert (run / "student.pt").exists()
    saved = torch.load(run / "student.pt", weights_only=True)["state_dict"]
    assert _same(saved, r0["student"])
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["extra"]["world"] == 2 and len(ckpt["extra"]["ranks"]) == 2
    assert not torch.equal(ckpt["extra"]["ranks"][0]["rng"]["torch"], ckpt["extra"]["ranks"][1]["rng"]["torch"])
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in records if "loss/student/total" in r]
    assert logged == sorted(set(logged)) and logged[-1] == 6, "rank 0 alone logs, once a step"


@pytest.mark.parametrize("trouble", ["nan", "sigint"])
def test_trouble_on_one_rank_stops_every_rank_at_the_same_round(trouble: str, teacher_file: str,
                                                                tmp_path: Path) -> None:
    """A non-finite loss or a Ctrl-C seen by rank 1 alone: both ranks stop after the same round, none hangs."""
    cfg = _config("dfad", tmp_path, teacher_file, steps=40, ckpt_every=100)
    r0, r1 = run_two(cfg, tmp_path, trouble)
    expected = "training diverged at step 6" if trouble == "nan" else "Interrupted: stopped at step 6"
    assert expected in r0["error"] and expected in r1["error"], (r0, r1)
    if trouble == "nan":
        assert "on another rank" in r0["error"] and "student/total became nan" in r1["error"]
    else:  # the agreed stop wrote a checkpoint of that round
        assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 6
    assert not (tmp_path / "run" / "student.pt").exists()


def test_an_error_on_rank_0_alone_reaches_every_rank(teacher_file: str, tmp_path: Path) -> None:
    """Rank 0 alone prepares --out; when it refuses the folder, rank 1 stops too instead of waiting for it."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    r0, r1 = run_two(_config("dfad", tmp_path, teacher_file), tmp_path)
    assert r0["error"].startswith("DfkdError: --out") and "not empty (holds notes.txt)" in r0["error"]
    assert r1["error"] == r0["error"].replace("DfkdError: ", "OtherRankFailed: rank 0 stopped: "), r1
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["notes.txt"], "nothing written beside it"


def test_a_resume_one_rank_refuses_stops_every_rank_before_the_log_is_cut(teacher_file: str, tmp_path: Path) -> None:
    """Rank 1's own pool file gone: rank 1 refused, and rank 0 died in a collective with a gloo traceback (after it
    had cut metrics.jsonl for the resume)."""
    cfg = _config("deepinversion", tmp_path, teacher_file, steps=4)
    assert all("error" not in r for r in run_two(cfg, tmp_path))
    run = tmp_path / "run"
    pools = sorted((run / "rank1").glob("pool-*.bin"))
    assert pools, "rank 1 keeps its own pool files"
    pools[0].unlink()
    log = (run / "metrics.jsonl").read_bytes()
    r0, r1 = run_two({"resume": str(run), "steps": 8}, tmp_path)
    assert "is missing" in r1["error"] and r1["error"].startswith("OtherRankFailed: "), r1
    assert r0["error"].startswith("DfkdError: rank 1 stopped: ") and "is missing" in r0["error"], r0
    assert (run / "metrics.jsonl").read_bytes() == log


def test_transfer_file_without_teacher_on_two_ranks(transfer_file: str, tmp_path: Path) -> None:
    cfg = {"teachers": [], "transfer_data": transfer_file, "method": "transfer", "student": "lenet5_half",
           "steps": 4, "out": str(tmp_path / "run"), "fid_every": 0, "device": "cpu",
           "params": {"batch_size": 8, "s_steps": 2}}
    r0, r1 = run_two(cfg, tmp_path)
    assert _same(r0["student"], r1["student"]) and r0["batch"] == 4
    assert not torch.equal(r0["last"], r1["last"]), "each rank reads its own half of the file"


def test_two_ranks_learn_together_from_the_start(teacher_file: str, tmp_path: Path) -> None:
    """Averaged gradients move the student: it is not the initial one, and it is not a 1-process run's."""
    cfg = _config("dfad", tmp_path, teacher_file)
    r0, _ = run_two(cfg, tmp_path)
    single = distill(DistillConfig.from_dict({**cfg, "out": str(tmp_path / "single")}))
    one = torch.load(single.run_dir / "student.pt", weights_only=True)["state_dict"]
    assert not _same(one, r0["student"])
    start = torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=True)
    assert start["extra"]["world"] == 1 and "ranks" not in start["extra"]


def _loss_steps(run: Path) -> list[int]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss/student/total" in rec:
            out.append(rec["step"])
    return out


def _torchrun(args: list[Any]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dfkd",
           *map(str, args)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def kill_tree(pid: int) -> None:
    """SIGKILL torchrun's agent and every worker (torchrun starts each worker in a session of its own)."""
    psutil = pytest.importorskip("psutil")
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)


def test_sigkill_of_the_whole_job_then_resume_equals_uninterrupted(teacher_file: str, tmp_path: Path) -> None:
    """torchrun -m dfkd distill, SIGKILL of every process between checkpoints, --resume on 2 ranks: same student."""
    steps = 40
    cfg = _config("deepinversion", tmp_path / "full", teacher_file, steps=steps)
    run_two(cfg, tmp_path)
    full = torch.load(tmp_path / "full" / "run" / "student.pt", weights_only=True)["state_dict"]

    config = tmp_path / "c.json"
    config.write_text(json.dumps({k: v for k, v in cfg.items() if k not in ("out", "teachers")}))
    run = tmp_path / "killed"
    p = _torchrun(["distill", "--teacher", teacher_file, "--config", config, "--out", run])
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and p.poll() is None and not any(s >= 6 for s in _loss_steps(run)):
        time.sleep(0.01)
    kill_tree(p.pid)
    p.communicate(timeout=60)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert 0 < ckpt["step"] < steps and not ckpt["finished"] and not (run / "student.pt").exists()
    assert list((run / "rank1").glob("pool-*.bin")), "rank 1 keeps its own pool shard in the run folder"

    with pytest.raises(DfkdError, match="made by 2 process.*resume it with torchrun on 2 processes"):
        resume(run)
    r0, r1 = run_two({"resume": str(run)}, tmp_path)
    assert "error" not in r0 and "error" not in r1, (r0, r1)
    assert _same(torch.load(run / "student.pt", weights_only=True)["state_dict"], full)
    assert _same(r1["student"], full)
    logged = _loss_steps(run)
    assert logged == sorted(set(logged)) and logged[-1] == steps
