"""Transfer files: provenance, the student recipe, label minimisation and `dfkd report FILE.npz`."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from dfkd import __version__
from dfkd.cli.main import main
from dfkd.config import resolve_params
from dfkd.errors import DfkdError
from dfkd.labels import LabelSpec, minimise, parse_labels
from dfkd.methods import get_method
from dfkd.methods.transfer import NoTeacher
from dfkd.modelfile import ModelFile, save_model
from dfkd.spec import MNIST_SPEC
from dfkd.students import build_student
from dfkd.teacher import load_teacher
from dfkd.transfer import load_transfer, save_transfer, synthesize
from dfkd.transfer_report import report_transfer
from tests.conftest import KWARGS, ZSKD_FAST, make_teacher_module

PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]])


# --- label minimisation -------------------------------------------------------------------------------------------
def test_label_modes_keep_what_they_say() -> None:
    assert torch.equal(minimise(PROBS, LabelSpec()), PROBS)
    assert torch.equal(minimise(PROBS, parse_labels("hard")), torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0]]))
    top2 = minimise(PROBS, parse_labels("topk=2"))
    assert torch.allclose(top2, torch.tensor([[0.625, 0.375, 0, 0], [0, 0, 3 / 7, 4 / 7]]))
    sharp, flat = minimise(PROBS, parse_labels("temperature=0.5")), minimise(PROBS, parse_labels("temperature=4"))
    assert (sharp.max(1).values > PROBS.max(1).values).all() and (flat.max(1).values < PROBS.max(1).values).all()
    assert torch.equal(sharp.argmax(1), PROBS.argmax(1))
    rounded = minimise(torch.softmax(torch.randn(50, 10) * 3, 1), parse_labels("soft", decimals=1))
    assert torch.allclose(rounded.sum(1), torch.ones(50))
    assert len(torch.unique((rounded * 10).round() / 10)) <= 11 + 10  # one-decimal values, renormalised
    for spec, decimals in (("soft", 2), ("topk=3", 2), ("hard", None), ("temperature=2", 2)):
        p = minimise(PROBS, parse_labels(spec, decimals=decimals))
        assert torch.allclose(p.sum(1), torch.ones(2)) and torch.equal(p.argmax(1), PROBS.argmax(1)), spec


@pytest.mark.parametrize("text,decimals,match", [
    ("top3", None, "use soft, hard"), ("topk=0", None, "K must be"), ("topk=a", None, "K must be"),
    ("temperature=-1", None, "positive number"), ("temperature=nan", None, "positive number"),
    ("hard=2", None, "use soft"), ("soft", 0, "1 to 8 decimals"),
])
def test_bad_label_specs_are_clear_errors(text: str, decimals: int | None, match: str) -> None:
    with pytest.raises(DfkdError, match=match):
        parse_labels(text, decimals)


def test_synthesize_stores_minimised_labels(sharp_teacher_file: str, transfer_file: str, tmp_path: Path) -> None:
    t = load_teacher(sharp_teacher_file)
    hard = synthesize(t, "zskd", 64, tmp_path / "h.npz", params=ZSKD_FAST, labels=parse_labels("hard"), views=1)
    assert set(hard.probs.unique().tolist()) == {0.0, 1.0}
    top2 = synthesize(t, "zskd", 64, tmp_path / "k.npz", params=ZSKD_FAST, labels=parse_labels("topk=2", 2), views=1)
    assert ((top2.probs > 0).sum(1) <= 2).all()
    assert torch.allclose(top2.probs * 100, (top2.probs * 100).round(), atol=1e-3)
    assert top2.provenance["labels"] == "topk=2, 2 decimals"
    soft = load_transfer(transfer_file)
    assert torch.equal(hard.probs.argmax(1), soft.probs[:64].argmax(1))  # same seed, same images, same classes


def test_a_topk_that_keeps_every_class_is_said_to(sharp_teacher_file: str, tmp_path: Path) -> None:
    # --labels topk=50 on a 10-class teacher stored the full softmax without a word, to a user minimising labels
    t = load_teacher(sharp_teacher_file)
    for k, warns in ((50, True), (9, False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            synthesize(t, "zskd", 8, tmp_path / f"k{k}.npz", params=ZSKD_FAST, labels=parse_labels(f"topk={k}"),
                       views=1)
        said = [str(w.message) for w in caught if "keeps all of them" in str(w.message)]
        assert said == ([f"--labels topk={k}: the teacher has 10 classes, so every row keeps all of them, as --labels "
                         "soft does; give K under 10 to store less"] if warns else [])


# --- provenance and the recipe --------------------------------------------------------------------------------------
def test_provenance_records_teacher_method_settings_version_date(transfer_file: str, sharp_teacher_file: str) -> None:
    data = load_transfer(transfer_file)
    prov = data.provenance
    assert prov["teacher"]["sha256"] == load_teacher(sharp_teacher_file).sha256 == data.teacher_sha256
    assert prov["teacher"]["file"] == "teacher.pt" and prov["teacher"]["top1"] is None
    assert prov["method"] == "zskd" and prov["num"] == 256 and prov["seed"] == 0 and prov["labels"] == "soft"
    assert prov["settings"]["di_iters"] == ZSKD_FAST["di_iters"]  # the resolved settings, overrides included
    assert prov["dfkd_version"] == __version__ and prov["date"].startswith("20")
    zskd = get_method("zskd").default_params(load_teacher(sharp_teacher_file))
    assert data.recipe["T"] == zskd["T"] and data.recipe["lr_s"] == zskd["lr_s"]
    assert data.recipe["method_augment"] == zskd["augment"] and data.recipe["augment"] == "none"


def test_teacher_accuracy_is_recorded_when_known(tmp_path: Path, eval_npz: str) -> None:
    path = tmp_path / "t.pt"
    save_model(path, make_teacher_module(), ModelFile("lenet5_bn", KWARGS, MNIST_SPEC, 10,
                                                      provenance={"top1": 0.987}))
    t = load_teacher(path)
    recorded = synthesize(t, "zskd", 8, tmp_path / "a.npz", params=ZSKD_FAST)
    assert recorded.provenance["teacher"]["top1"] == pytest.approx(0.987)
    measured = synthesize(t, "zskd", 8, tmp_path / "b.npz", params=ZSKD_FAST, eval_data=eval_npz)
    from dfkd.data import load_images
    from dfkd.evaluate import accuracy

    expected = accuracy(t, load_images(eval_npz), t.spec, torch.device("cpu"))["top1"]
    assert measured.provenance["teacher"]["top1"] == pytest.approx(expected)
    assert measured.provenance["teacher"]["top1_on"] == "eval.npz; near chance: likely not data of this teacher"


def test_receiver_adopts_the_recipe_unless_overridden(transfer_file: str) -> None:
    data = load_transfer(transfer_file)
    cls = get_method("transfer")
    adopted = cls.default_params(NoTeacher(data))
    assert adopted["T"] == data.recipe["T"] != cls.defaults["T"]
    assert adopted["schedule"] == data.recipe["schedule"] != cls.defaults["schedule"]
    assert adopted["augment"] == "none" and "method_augment" not in adopted  # recorded, applied only on request
    assert cls.default_params(None)["T"] == cls.defaults["T"]  # a run with --teacher keeps the KD defaults
    params = resolve_params(adopted, {"T": 2.0, "transfer_data": transfer_file}, "transfer")
    m = cls(NoTeacher(data), build_student("lenet5_half", KWARGS), params, torch.device("cpu"))
    assert m.p["T"] == 2.0  # the user's -p wins over the file's recipe
    assert m.opt_s.param_groups[0]["lr"] == data.recipe["lr_s"] and isinstance(m.opt_s, torch.optim.Adam)


def test_version_1_files_still_load(transfer_file: str, tmp_path: Path) -> None:
    with np.load(transfer_file) as d:
        arrays = {k: d[k] for k in d.files if k not in ("provenance", "recipe")}
    arrays["version"] = np.int64(1)
    np.savez(tmp_path / "v1.npz", **arrays)
    old = load_transfer(tmp_path / "v1.npz")
    assert old.provenance == {} and old.recipe == {} and len(old) == 256
    assert "version-1 file" in report_transfer(tmp_path / "v1.npz", png=False).text()


def test_broken_provenance_is_a_clear_error(transfer_file: str, tmp_path: Path) -> None:
    with np.load(transfer_file) as d:
        arrays = {k: d[k] for k in d.files}
    arrays["recipe"] = np.str_("[1, 2")
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DfkdError, match="'recipe' entry is not a JSON object"):
        load_transfer(tmp_path / "bad.npz")


@pytest.mark.parametrize("key, value, needs", [("batch_size", -3, "batch_size = -3: method transfer needs"),
                                               ("s_optimizer", "rmsprop", "s_optimizer = 'rmsprop'")])
def test_a_damaged_recipe_is_refused_before_a_run_starts(transfer_file: str, tmp_path: Path, key: str, value: object,
                                                          needs: str) -> None:
    # batch_size -3 ran to the first batch: a torch.cat traceback and a run folder that looked resumable
    with np.load(transfer_file) as d:
        arrays = {k: d[k] for k in d.files}
    arrays["recipe"] = np.str_(json.dumps({**json.loads(str(arrays["recipe"])), key: value}))
    np.savez(tmp_path / "bad.npz", **arrays)
    res = CliRunner().invoke(main, ["distill", "--transfer-data", str(tmp_path / "bad.npz"), "--student",
                                    "lenet5_half", "--steps", "3", "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and f"error: --transfer-data {tmp_path / 'bad.npz'}: its recorded student recipe is " \
        f"damaged ({needs}" in res.output and "dfkd synthesize" in res.output
    assert not (tmp_path / "run").exists()


# --- dfkd report FILE.npz -------------------------------------------------------------------------------------------
def test_report_shows_provenance_histogram_and_writes_class_grid(transfer_file: str, tmp_path: Path) -> None:
    local = tmp_path / "t.npz"
    data = load_transfer(transfer_file)
    save_transfer(local, data.x, data.probs, data.spec, data.method, data.teacher_sha256, data.provenance,
                  data.recipe)
    res = CliRunner().invoke(main, ["report", str(local)])
    assert res.exit_code == 0, res.output
    counts = torch.bincount(data.probs.argmax(1), minlength=10).tolist()
    assert "classes:  " + "  ".join(f"{c}:{n}" for c, n in enumerate(counts)) in res.output
    assert "method zskd" in res.output and __version__ in res.output and data.teacher_sha256[:16] in res.output
    png = tmp_path / "t_samples.png"
    assert png.is_file() and str(png) in res.output
    img = np.asarray(Image.open(png))
    assert img.shape[:2] == (10 * 34 + 2, 10 * 34 + 2)  # 10 classes x 10 samples, 32 px + 2 px padding
    res = CliRunner().invoke(main, ["report", str(tmp_path / "missing.npz")])
    assert res.exit_code == 2 and "no such file" in res.output


def test_cli_synthesize_label_flags(teacher_file: str, tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["synthesize", "--teacher", teacher_file, "--method", "zskd", "--num", "8", "-p", "di_batch=8",
            "-p", "di_iters=2", "-p", "s_steps=0", "--device", "cpu"]
    res = runner.invoke(main, [*base, "--labels", "topk=0", "--out", str(tmp_path / "a.npz")])
    assert res.exit_code == 2 and "K must be" in res.output and not (tmp_path / "a.npz").exists()
    res = runner.invoke(main, [*base, "--labels", "hard", "--label-decimals", "2", "--out", str(tmp_path / "c.npz")])
    assert res.exit_code == 2 and "nothing to round" in res.output and not (tmp_path / "c.npz").exists()  # was taken
    res = runner.invoke(main, [*base, "--labels", "hard", "--out", str(tmp_path / "b.npz")])
    assert res.exit_code == 0, res.output
    assert load_transfer(tmp_path / "b.npz").provenance["labels"] == "hard"


# --- resumable, chunked synthesis -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,params", [("zskd", ZSKD_FAST), ("dfad", {"batch_size": 8})])
def test_interrupted_synthesis_resumes_to_the_same_file(method: str, params: dict, sharp_teacher_file: str,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dfkd.synthesis as synthesis
    from dfkd.transfer_parts import Parts

    monkeypatch.setattr(synthesis, "PART_IMAGES", 16)
    t = load_teacher(sharp_teacher_file)
    steps = 2 if method == "dfad" else None
    full = synthesize(t, method, 72, tmp_path / "full.npz", params=params, steps=steps, views=1)
    original, calls = Parts.add, {"n": 0}

    def dying_add(self, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *a, **kw)

    out = tmp_path / "cut.npz"
    monkeypatch.setattr(Parts, "add", dying_add)
    with pytest.raises(KeyboardInterrupt):
        synthesize(t, method, 72, out, params=params, steps=steps, views=1)
    monkeypatch.setattr(Parts, "add", original)
    assert not out.exists() and len(list((tmp_path / "cut.npz.parts").glob("part-*.npz"))) == 2
    for given in (out, tmp_path / "cut.npz.parts"):  # report said "no such file" / "not a dfkd run folder"
        with pytest.raises(DfkdError, match=f"FILE {out}: not written yet: a `dfkd synthesize --out {out}` run stopped "
                                            "with 2 part"):
            report_transfer(given)
    with pytest.raises(DfkdError, match="other settings \\(num\\)"):
        synthesize(t, method, 80, out, params=params, steps=steps, views=1)
    resumed = synthesize(t, method, 72, out, params=params, steps=steps, views=1)
    assert torch.equal(resumed.x, full.x) and torch.equal(resumed.probs, full.probs)
    assert not (tmp_path / "cut.npz.parts").exists()


def test_a_stop_between_a_part_and_its_state_makes_no_image_twice(sharp_teacher_file: str, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # the resumed run made the unrecorded part's images again from the earlier state: the file held them twice
    import dfkd.synthesis as synthesis
    import dfkd.transfer_parts as transfer_parts

    monkeypatch.setattr(synthesis, "PART_IMAGES", 16)
    t, params = load_teacher(sharp_teacher_file), {"batch_size": 8}
    full = synthesize(t, "dfad", 72, tmp_path / "full.npz", params=params, steps=2, views=1)
    original, calls = transfer_parts.atomic_torch_save, {"n": 0}

    def dying_state_save(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] == 3:  # the third part is on disk, its state is not
            raise KeyboardInterrupt
        return original(*a, **kw)

    out = tmp_path / "cut.npz"
    monkeypatch.setattr(transfer_parts, "atomic_torch_save", dying_state_save)
    with pytest.raises(KeyboardInterrupt):
        synthesize(t, "dfad", 72, out, params=params, steps=2, views=1)
    monkeypatch.setattr(transfer_parts, "atomic_torch_save", original)
    assert len(list((tmp_path / "cut.npz.parts").glob("part-*.npz"))) == 3
    resumed = synthesize(t, "dfad", 72, out, params=params, steps=2, views=1)
    assert torch.equal(resumed.x, full.x) and torch.equal(resumed.probs, full.probs)


def test_assembled_file_is_mapped_not_read(transfer_file: str) -> None:
    from dfkd.io import memmap_member

    mapped = memmap_member(transfer_file, "x")
    with np.load(transfer_file) as d:
        assert isinstance(mapped, np.memmap) and np.array_equal(mapped, d["x"])
    np.savez_compressed(Path(transfer_file).with_name("z.npz"), x=np.zeros(3))
    assert memmap_member(Path(transfer_file).with_name("z.npz"), "x") is None
