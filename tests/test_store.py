"""Pool and memory bank storage: grown as filled, on disk past a RAM budget, never copied into checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from dfkd.config import DistillConfig
from dfkd.engine import distill, resume
from dfkd.errors import DfkdError
from dfkd.generators import ImagePool, MemoryBank
from dfkd.generators import store as store_mod
from dfkd.generators.store import RecordStore
from dfkd.methods import get_method


def rows(start: int, n: int) -> torch.Tensor:
    return torch.arange(start, start + n, dtype=torch.float32)[:, None].expand(n, 2).clone()


def test_nothing_is_allocated_for_the_capacity_up_front():
    pool = ImagePool(256_000)  # DeepInversion's default: 77 GB of 224 px images if allocated at once
    pool.add(torch.randn(4, 3, 224, 224), torch.randn(4, 10))
    assert pool.store.nbytes_in_memory() < 16 * 3 * 224 * 224 * 2, "grown to what it holds, not to its capacity"
    assert len(pool) == 4 and pool.sample(2)[0].shape == (2, 3, 224, 224)


def test_past_the_budget_it_serves_the_same_records_from_disk(tmp_path: Path):
    budget = 40 * 16 * 2 / 2**20  # 40 images of 1x4x4 float16
    mem, disk = ImagePool(100), ImagePool(100, ram_budget_mib=budget)
    for _ in range(6):
        x = torch.randn(10, 1, 4, 4)
        mem.add(x)
        disk.add(x)
    assert disk.store.on_disk and not mem.store.on_disk and disk.store.nbytes_in_memory() == 0
    torch.manual_seed(0)
    a = mem.sample(17)[0]
    torch.manual_seed(0)
    b = disk.sample(17)[0]
    assert torch.equal(a, b) and torch.equal(mem.newest(60), disk.newest(60))
    disk.close()


def test_ring_semantics_on_disk_and_resume_from_the_files(tmp_path: Path):
    bank = MemoryBank(capacity=5, dim=2, ram_budget_mib=0)  # on disk from the first row
    bank.attach(tmp_path)
    bank.add(rows(0, 3))
    bank.add(rows(3, 4))  # 7 rows into 5 slots: rows 0 and 1 drop out
    assert bank.data[:, 0].tolist() == [2, 3, 4, 5, 6]
    state = json.loads(json.dumps(bank.state_dict()))  # counters and layout only: plain types
    assert "records" not in state["store"]
    bank.add(rows(7, 2))  # the run goes on after its checkpoint, then dies
    other = MemoryBank(capacity=5, dim=2, ram_budget_mib=0)
    other.attach(tmp_path)
    other.load_state_dict(state)
    assert other.data[:, 0].tolist() == [2, 3, 4, 5, 6], "rows written after the checkpoint are not seen"
    other.add(rows(7, 1))
    assert other.data[:, 0].tolist() == [3, 4, 5, 6, 7]


def test_segments_no_checkpoint_needs_are_deleted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(store_mod, "SEGMENT_BYTES", 16)  # 2 records of 2 float32 per segment file
    s = RecordStore(4, "bank", folder=tmp_path)
    s.append(rows(0, 10))
    first = s.state_dict()  # records 6..9 needed
    s.append(rows(10, 4))
    second = s.state_dict()  # records 10..13 needed; the first checkpoint's segments (3, 4) must stay
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"bank-0000{i}.bin" for i in range(3, 7)]
    for state, first_id in ((first, 6), (second, 10)):
        t = RecordStore(4, "bank", folder=tmp_path)
        t.load_state_dict(state)
        assert t.gather(torch.arange(4))[0][:, 0].tolist() == list(range(first_id, first_id + 4))


def test_missing_files_are_reported(tmp_path: Path):
    pool = ImagePool(8, root=tmp_path)
    pool.add(torch.zeros(2, 1, 4, 4))
    state = pool.state_dict()
    for f in tmp_path.iterdir():
        f.unlink()
    # a FileNotFoundError reached the user as a traceback (exit 1); a DfkdError is one line, exit 2
    with pytest.raises(DfkdError, match="pool-00000.bin is missing: .* files are incomplete; the run cannot resume"):
        ImagePool(8, root=tmp_path).load_state_dict(state)


def test_truncated_files_are_reported(tmp_path: Path):
    # a RuntimeError traceback on resume (in-memory pools) or at the first read (pools read from disk)
    pool = ImagePool(8, root=tmp_path)
    pool.add(torch.zeros(3, 1, 4, 4))
    state = pool.state_dict()
    (file,) = tmp_path.iterdir()
    os.truncate(file, file.stat().st_size - 1)
    with pytest.raises(DfkdError, match="pool-00000.bin is shorter than the records the run wrote into it"):
        ImagePool(8, root=tmp_path).load_state_dict(state)


def cfg(teacher_file: str, out: Path, method: str, steps: int, **params) -> DistillConfig:
    quick = dict(get_method(method).quick)
    return DistillConfig(teachers=(teacher_file,), method=method, steps=steps, out=str(out), log_every=2,
                         image_every=100, eval_every=100, ckpt_every=4, fid_every=0, deterministic=True,
                         params={**quick, **params})


def test_checkpoint_does_not_grow_with_the_pool(teacher_file: str, tmp_path: Path):
    sizes, pools = [], []
    for steps in (4, 24):
        run = distill(cfg(teacher_file, tmp_path / str(steps), "deepinversion", steps)).run_dir
        sizes.append((run / "checkpoint.pt").stat().st_size)
        pools.append(sum(f.stat().st_size for f in run.glob("pool-*.bin")))
    assert pools[1] >= 5 * pools[0] > 0, "the pool (in the run folder) grew sixfold"
    assert abs(sizes[1] - sizes[0]) < 512, f"checkpoint sizes {sizes} differ"


@pytest.mark.parametrize("method", ["deepinversion", "cmi"])
def test_resume_with_the_pool_on_disk_is_exact(method: str, teacher_file: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch):
    full = distill(cfg(teacher_file, tmp_path / "full", method, 12, ram_budget_mib=0))
    cls, original, calls = get_method(method), get_method(method).round, {"n": 0}

    def dying_round(self):
        calls["n"] += 1
        if calls["n"] == 4:  # after the step-4 checkpoint, with rounds the checkpoint did not see on disk
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(cls, "round", dying_round)
    with pytest.raises(KeyboardInterrupt):
        distill(cfg(teacher_file, tmp_path / "killed", method, 12, ram_budget_mib=0))
    monkeypatch.setattr(cls, "round", original)
    resumed = resume(tmp_path / "killed")
    a = torch.load(full.run_dir / "student.pt", weights_only=True)["state_dict"]
    b = torch.load(resumed.run_dir / "student.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if method == "cmi":
        assert list(resumed.run_dir.glob("bank-*.bin")), "the memory bank is on disk too"


def test_peak_rss_is_logged_and_reported(teacher_file: str, tmp_path: Path):
    from dfkd.report import report

    result = distill(cfg(teacher_file, tmp_path / "r", "dfad", 4))
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert 50 < result.peak_rss_mib < 64 * 1024, "this process's peak RSS, in MiB"
    assert any("perf/peak_rss_mib" in r for r in records) and records[-1]["peak_rss_mib"] == result.peak_rss_mib
    assert "peak RSS" in report(result.run_dir).text()
