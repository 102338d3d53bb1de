"""Data sources (dfkd.sources), one build_method, checkpoint RNG state, and the distributed helpers without a job."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from dfkd.build import build_method
from dfkd.checkpoint import rng_state, set_rng_state
from dfkd.config import DistillConfig
from dfkd.distributed import SINGLE, Dist, rank_device, rank_seed, shared_modules, shared_optimizers
from dfkd.engine import Run
from dfkd.errors import DfkdError
from dfkd.methods import get_method
from dfkd.sources import RealImages, Synthesized, TransferFile, default_method, rank_slice, source_for
from dfkd.teacher import load_teacher


def test_flags_pick_the_source_and_its_default_method(teacher_file: str) -> None:
    assert isinstance(source_for(DistillConfig(teachers=(teacher_file,))), Synthesized)
    assert isinstance(source_for(DistillConfig(transfer_data="t.npz", method="transfer")), TransferFile)
    assert isinstance(source_for(DistillConfig(teachers=(teacher_file,), data="d.npz", method="kd")), RealImages)
    assert default_method({"transfer_data": "t.npz", "data": None}) == "transfer"
    assert default_method({"transfer_data": None, "data": "d.npz"}) == "kd"
    assert default_method({"transfer_data": None, "data": None}) is None
    with pytest.raises(DfkdError, match="--transfer-data and --data: a run trains on one kind of data"):
        source_for(DistillConfig(teachers=(teacher_file,), transfer_data="t.npz", data="d.npz"))


@pytest.mark.parametrize(("cfg", "message"), [
    (DistillConfig(), "needs --teacher FILE"),
    (DistillConfig(transfer_data="t.npz", method="dfad"), "not --method dfad"),
    (DistillConfig(transfer_data="t.npz", method="transfer"), "needs --student ARCH"),
    (DistillConfig(teachers=("t.pt",), data="d.npz", method="dfad"), "method dfad is data-free"),
])
def test_each_source_refuses_what_it_cannot_run(cfg: DistillConfig, message: str) -> None:
    with pytest.raises(DfkdError, match=message):
        source_for(cfg).check()


def test_the_engine_names_no_source() -> None:
    """Run and the loop know sources only through dfkd.sources: no flag, method or stand-in teacher by name."""
    import inspect

    import dfkd.engine

    engine = inspect.getsource(Run) + inspect.getsource(dfkd.engine._execute) + inspect.getsource(dfkd.engine._new_run)
    for name in ("transfer_data", "NoTeacher", '"transfer"', "cfg.data", "load_transfer", '"kd"'):
        assert name not in engine, name
    import dfkd.cli.main

    cli = inspect.getsource(dfkd.cli.main)
    assert not re.search(r'flags\["method"\] = "(transfer|kd)"', cli)


def test_a_batch_is_split_evenly_across_ranks(teacher_file: str) -> None:
    src = source_for(DistillConfig(teachers=(teacher_file,)))
    params = {"batch_size": 64, "synth_batch_size": 32, "lr_s": 0.1}
    assert src.local_params(params, 1) is params
    assert src.local_params(params, 4) == {"batch_size": 16, "synth_batch_size": 8, "lr_s": 0.1}
    assert src.local_params({"batch_size": 8, "synth_batch_size": None}, 2)["synth_batch_size"] is None
    with pytest.raises(DfkdError, match=r"-p batch_size=10: .* 4 processes .* multiple of 4"):
        src.local_params({"batch_size": 10}, 4)


def test_rank_slices_cover_the_data_once() -> None:
    parts = [rank_slice(10, r, 3) for r in range(3)]
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    with pytest.raises(DfkdError, match="holds 1 images, fewer than the 2 processes"):
        rank_slice(1, 0, 2)


def _transfer_run(transfer_file: str, tmp_path: Path) -> Run:
    cfg = DistillConfig(transfer_data=transfer_file, method="transfer", student="lenet5_half", steps=2, fid_every=0,
                        params={"batch_size": 8})
    return Run(cfg, tmp_path)


def test_a_transfer_file_is_sharded_by_rank(transfer_file: str, tmp_path: Path) -> None:
    run = _transfer_run(transfer_file, tmp_path)
    whole = run.method.data
    shards = []
    for rank in range(2):
        m = _transfer_run(transfer_file, tmp_path).method
        run.source.shard(m, rank, 2)
        shards.append(m.data)
        assert len(m.order) == len(m.data) == len(whole) // 2 and m.cursor == 0
    assert torch.equal(torch.cat([shards[0].x[:1], shards[1].x[:1]]), whole.x[:2])
    assert torch.equal(shards[1].probs, whole.probs[1::2])
    assert not run.source.has_teacher


def test_real_images_are_sharded_by_rank(teacher_file: str, eval_npz: str, tmp_path: Path) -> None:
    cfg = DistillConfig(teachers=(teacher_file,), method="kd", data=eval_npz, steps=2, fid_every=0,
                        params={"batch_size": 8})
    run = Run(cfg, tmp_path)
    whole = run.method.synth.data
    run.source.shard(run.method, 1, 2)
    assert torch.equal(run.method.synth.data.y, whole.y[1::2]) and torch.equal(run.method.synth.data.x, whole.x[1::2])


def test_one_build_method_for_distill_and_synthesize(teacher_file: str, tmp_path: Path) -> None:
    """Run builds its method with build_method: the same student and settings as a direct call (with the run's
    default --student-init, auto: sliced from the teacher)."""
    teacher = load_teacher(teacher_file)
    built = build_method("dfad", teacher, {"batch_size": 8}, torch.device("cpu"), seed=3, student_init="auto")
    run = Run(DistillConfig(teachers=(teacher_file,), method="dfad", seed=3, fid_every=0, device="cpu",
                            params={"batch_size": 8}), tmp_path)
    assert built.params == run.params and built.student_name == run.student_name
    for k, v in built.method.student.state_dict().items():
        assert torch.equal(v, run.method.student.state_dict()[k]), k
    halves = build_method("dfad", teacher, {"batch_size": 8}, torch.device("cpu"), seed=3,
                          local=lambda p: {**p, "batch_size": 4})
    assert halves.params["batch_size"] == 8 and halves.method.p["batch_size"] == 4
    import inspect

    import dfkd.transfer

    assert "build_method(" in inspect.getsource(dfkd.transfer.synthesize)  # synthesize lives in dfkd.synthesis


def test_shared_networks_are_found_for_every_method_family(teacher_file: str) -> None:
    teacher = load_teacher(teacher_file)

    def make(name: str, **p: object):  # noqa: ANN202
        return build_method(name, teacher, {**get_method(name).quick, **p}, torch.device("cpu"), seed=0).method

    dfad = make("dfad")
    assert {id(o) for o in shared_optimizers(dfad)} == {id(dfad.opt_s), id(dfad.synth.optimizer)}
    assert {id(m) for m in shared_modules(dfad)} == {id(dfad.student), id(dfad.synth.generator)}
    fast = make("fast")
    assert fast.synth.meta_optimizer in shared_optimizers(fast) and fast.synth.generator in shared_modules(fast)
    cmi = make("cmi")  # its generator is re-initialised for every batch: that rank's synthesis, not shared
    assert shared_optimizers(cmi) == [cmi.opt_s] and shared_modules(cmi) == [cmi.student]
    adversarial = make("deepinversion", discriminator="logits")
    (critic,) = [o.disc for o in adversarial.objectives]
    assert critic.net in shared_modules(adversarial) and critic.opt in shared_optimizers(adversarial)
    online = make("online")
    assert online.peer in shared_modules(online) and online.opt_peer in shared_optimizers(online)
    assert all(d.opt in shared_optimizers(online) and d.net in shared_modules(online) for d in online.discs)


def test_ranks_draw_their_own_streams() -> None:
    seeds = {rank_seed(7, r) for r in range(8)} | {7}
    assert len(seeds) == 9 and all(0 <= s < 2**63 for s in seeds)
    assert rank_seed(2**63 - 1, 3) < 2**63


def test_one_process_needs_no_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not SINGLE.enabled and SINGLE.main
    assert SINGLE.agree(1.5, False, True) == (1.5, False, True)
    assert SINGLE.on_main(lambda: 3) == 3 and SINGLE.gather({"a": torch.ones(1)})[0]["a"].item() == 1
    assert rank_device("cuda:1", SINGLE) == "cuda:1"
    with pytest.raises(DfkdError, match="--device cuda:1: under torchrun every process takes the GPU"):
        rank_device("cuda:1", Dist(rank=1, world=2, local_rank=1))
    assert rank_device("cpu", Dist(rank=1, world=2, local_rank=1)) == "cpu"


def test_checkpoint_rng_holds_the_run_device_only() -> None:
    state = rng_state(torch.device("cpu"))
    assert set(state) == {"torch"}, "no GPU states, whatever GPUs the machine has"
    expected = torch.rand(3)
    set_rng_state(state, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)
    # An older checkpoint's list of every GPU's state resumes on the CPU (or on fewer GPUs) without error.
    set_rng_state({**state, "cuda": [torch.zeros(16, dtype=torch.uint8)] * 8}, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_checkpoint_rng_on_a_gpu_restores_that_gpu() -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    state = rng_state(device)
    assert torch.is_tensor(state["cuda"])
    expected = torch.rand(3, device=device)
    set_rng_state(state, device)
    assert torch.equal(torch.rand(3, device=device), expected)
    set_rng_state({**state, "cuda": [state["cuda"]] * 64}, device)  # an old checkpoint from a 64-GPU machine
    assert torch.equal(torch.rand(3, device=device), expected)


def test_a_student_without_normalisation_is_clipped_unless_told(teacher_file: str) -> None:
    teacher, cpu = load_teacher(teacher_file), torch.device("cpu")
    plain = build_method("dfad", teacher, {"batch_size": 8}, cpu, seed=0)  # lenet5_half: no BatchNorm
    assert plain.params["clip_s"] == plain.method.p["clip_s"] == 1.0
    assert any("dfkd setting (not the paper's): clip_s = 1 (default: None; the student has no normalisation" in line
               for line in plain.recipe_lines)
    told = build_method("dfad", teacher, {"batch_size": 8, "clip_s": None}, cpu, seed=0)  # -p clip_s=null
    assert told.params["clip_s"] is None and not any("clip_s" in line for line in told.recipe_lines)
    normed = build_method("dfad", teacher, {"batch_size": 8}, cpu, seed=0, student="lenet5_half_bn")
    assert normed.params["clip_s"] is None
    own = build_method("fast", teacher, {}, cpu, seed=0)  # its CPU recipe clips already: that line, not this one
    assert own.params["clip_s"] == 1.0 and not any("normalisation layer" in line for line in own.recipe_lines)


def test_the_inversion_cpu_recipes_leave_the_student_unclipped(teacher_file: str) -> None:
    teacher, cpu = load_teacher(teacher_file), torch.device("cpu")
    for name in ("deepinversion", "adi"):
        assert build_method(name, teacher, {}, cpu, seed=0).params["clip_s"] is None  # its lr 0.01: the clip slowed it
        paper = build_method(name, teacher, {"recipe": "paper"}, cpu, seed=0)  # lr 0.1 killed a LeNet-5: clipped
        assert paper.params["clip_s"] == 1.0
    off = build_method("dfad", teacher, {"clip_unnormalised": False}, cpu, seed=0)
    assert off.params["clip_s"] is None
