"""The dfkd model file: round trip, plain-PyTorch loading, atomic writes, version refusal."""

from __future__ import annotations

import datetime as dt

import pytest
import torch

import dfkd
from dfkd import DfkdError, InputSpec, ModelFile, load_model, save_model
from dfkd.modelfile import FORMAT, NAMED_VERSION, VERSION

SPEC = InputSpec(1, 32, (0.1307,), (0.3081,))
KWARGS = {"num_classes": 10, "in_channels": 1, "input_size": 32}


def _trained_model() -> torch.nn.Module:
    """lenet5_bn whose BatchNorm running statistics are no longer the defaults (they must travel too)."""
    torch.manual_seed(0)
    model = dfkd.create_model("lenet5_bn", **KWARGS)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 1, 32, 32) * 3 + 1)
    return model.eval()


def _meta(**kw) -> ModelFile:
    return ModelFile("lenet5_bn", dict(KWARGS), SPEC, 10, **kw)


@pytest.fixture
def saved(tmp_path):
    model = _trained_model()
    path = tmp_path / "model.pt"
    names = [f"c{i}" for i in range(10)]
    save_model(path, model, _meta(class_names=names, provenance={"kind": "teacher", "epochs": 3}))
    return path, model, names


def test_round_trip_same_outputs_and_metadata(saved):
    path, model, names = saved
    loaded, meta = load_model(path)
    assert not loaded.training
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert meta.arch == "lenet5_bn" and meta.arch_kwargs == KWARGS
    assert meta.input_spec == SPEC and meta.num_classes == 10 and meta.class_names == names
    assert meta.provenance["kind"] == "teacher" and meta.provenance["epochs"] == 3


def test_provenance_date_is_now_in_utc(saved):
    _, meta = load_model(saved[0])
    when = dt.datetime.fromisoformat(meta.provenance["date"])
    assert when.tzinfo is not None
    assert abs((dt.datetime.now(dt.timezone.utc) - when).total_seconds()) < 600


def test_plain_pytorch_can_read_it(saved):
    path, model, _ = saved
    d = torch.load(path, weights_only=True)
    assert d["format"] == FORMAT and d["version"] == VERSION
    plain = dfkd.models.create(d["arch"], **d["arch_kwargs"])
    plain.load_state_dict(d["state_dict"])
    plain.eval()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))
    assert d["input_spec"] == SPEC.to_dict()
    assert d["num_classes"] == 10


def test_save_creates_missing_folders_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "a" / "b" / "m.pt"
    save_model(path, _trained_model(), _meta())
    assert [p.name for p in path.parent.iterdir()] == ["m.pt"]


def _failing_save(obj, f, *args, **kwargs):
    f.write(b"PK\x03\x04 half a file")  # some bytes reach the disk before the failure
    raise OSError("disk full")


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", _failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_model(tmp_path / "m.pt", _trained_model(), _meta())
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_old_file(saved, monkeypatch):
    path = saved[0]
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", _failing_save)
    with pytest.raises(OSError):
        save_model(path, dfkd.create_model("lenet5_bn", **KWARGS), _meta())
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    load_model(path)  # still a valid file


def _rewrite(path, **changes):
    d = torch.load(path, weights_only=True)
    for k, v in changes.items():
        if v is None:
            del d[k]
        else:
            d[k] = v
    torch.save(d, path)


def test_newer_version_refused(saved):
    path = saved[0]
    _rewrite(path, version=NAMED_VERSION + 1)
    with pytest.raises(DfkdError, match="newer") as e:
        load_model(path)
    assert str(path) in str(e.value) and "upgrade dfkd" in str(e.value)
    with pytest.raises(DfkdError, match="newer"):
        dfkd.load_teacher(path)


def test_missing_field_is_a_clear_error(saved):
    path = saved[0]
    _rewrite(path, input_spec=None)
    with pytest.raises(DfkdError, match="malformed field") as e:
        load_model(path)
    assert str(path) in str(e.value)


def test_weights_not_fitting_the_arch(saved):
    path = saved[0]
    _rewrite(path, arch="lenet5")  # no BatchNorm: the bn weights are unexpected
    with pytest.raises(DfkdError, match="do not fit the architecture") as e:
        load_model(path)
    assert str(path) in str(e.value)


def test_arch_kwargs_the_architecture_does_not_take(saved):
    path = saved[0]
    _rewrite(path, arch_kwargs={**KWARGS, "bogus": 3})
    with pytest.raises(DfkdError, match="bogus") as e:
        dfkd.load_teacher(path)
    assert str(path) in str(e.value) and "re-export" in str(e.value)


@pytest.mark.parametrize("changes", [{"num_classes": 3}, {"class_names": ["a", "b"]}])
def test_declared_classes_that_disagree_with_the_logits(saved, changes):
    path = saved[0]
    _rewrite(path, **changes)
    field = next(iter(changes))
    with pytest.raises(DfkdError, match=f"{field} says .* classes but its network gives 10 logits") as e:
        dfkd.load_teacher(path)
    assert str(path) in str(e.value) and "re-export" in str(e.value)


def test_a_file_spec_past_memory_is_refused_before_any_allocation(saved):
    path = saved[0]
    _rewrite(path, input_spec={**SPEC.to_dict(), "size": 100_000})
    with pytest.raises(DfkdError, match="the file's input spec .*100000 px is past what dfkd takes") as e:
        dfkd.load_teacher(path)
    assert str(path) in str(e.value)


def test_plain_state_dict_is_not_a_model_file(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(_trained_model().state_dict(), path)
    with pytest.raises(DfkdError, match="not a dfkd model file") as e:
        load_model(path)
    assert "--teacher-arch" in str(e.value) and "--model" in str(e.value)
