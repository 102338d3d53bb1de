"""A catalogue of hostile inputs: each gives exit code 2, one `error:` line, no traceback, and a known output state."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from conftest import KWARGS, make_teacher_module, stop_in_round
from PIL import Image

from dfkd import transfer_parts
from dfkd.cli.main import friendly, main
from dfkd.errors import DfkdError
from dfkd.modelfile import ModelFile, save_model
from dfkd.models import create
from dfkd.spec import MNIST_SPEC

QUICK = ["-p", "batch_size=8", "-p", "s_steps=2"]


def invoke(args: list[str]) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_refused(result: Result, *needles: str) -> str:
    """Exit 2, no traceback, exactly one error line holding every needle; returns that line."""
    text = result.output  # stdout and stderr together
    assert result.exit_code == 2, text
    assert result.exception is None or isinstance(result.exception, SystemExit), text
    assert "Traceback" not in text, text
    lines = [ln for ln in text.splitlines() if ln.lower().startswith("error:")]
    assert len(lines) == 1, text
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def tree(d: Path) -> dict[str, str]:
    """Every file under `d` with the hash of its bytes (to prove nothing changed)."""
    if not d.exists():
        return {}
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


# --- files the cases use -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, teacher_file: str) -> dict[str, str]:
    d = tmp_path_factory.mktemp("hostile")
    f: dict[str, str] = {"T": teacher_file}
    (d / "text.txt").write_text("hello, I am not a model\n")
    (d / "rand.bin").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    (d / "empty.pt").write_bytes(b"")
    f.update(text=str(d / "text.txt"), rand=str(d / "rand.bin"), empty=str(d / "empty.pt"))
    x = np.zeros((4, 28, 28), np.uint8)
    for name, y in {"strlab": np.array(list("abcd")), "neglab": np.array([-1, 0, 1, 2]),
                    "nanlab": np.array([np.nan, 0, 1, 2]), "biglab": np.array([0, 1, 2, 12])}.items():
        np.savez(d / f"{name}.npz", x=x, y=y)
        f[name] = str(d / f"{name}.npz")
    np.savez(d / "five.npz", x=np.zeros((4, 5, 28, 28), np.uint8), y=np.arange(4))
    (d / "dangling.pt").symlink_to(d / "gone.pt")  # replaced by a regular file without --force
    f["five"] = str(d / "five.npz")
    for name, mutate in {"nan_teacher": "nan", "zero_class": 0, "one_class": 1, "std0": "std0"}.items():
        f[name] = str(d / f"{name}.pt")
        _broken_teacher(Path(f[name]), mutate)
    f["fixed_batch"] = str(d / "fixed.pt2")
    _fixed_batch_export(Path(f["fixed_batch"]))
    m = create("lenet5", **KWARGS)
    torch.save(m, d / "pickle4.pt", pickle_protocol=4)
    f["pickle4"] = str(d / "pickle4.pt")
    for name, text in {"neg_steps.toml": "steps = -5\n", "two.toml": 'steps = "two"\n',
                       "seed_abc.toml": 'seed = "abc"\n', "ckpt0.toml": "ckpt_every = 0\n",
                       "eval0.json": '{"eval_every": 0}', "nan.json": '{"budget_minutes": NaN}',
                       "lr_abc.toml": '[params]\nlr_s = "abc"\n', "params5.toml": "params = 5\n",
                       "unknown.toml": "colour = 3\n", "list.json": "[1, 2]", "broken.toml": "steps = = 3\n",
                       "seed_neg.toml": "seed = -1\n", "fid1.toml": "fid_samples = 1\n",
                       "teachers5.toml": "teachers = 5\n", "bs0.json": '{"params": {"batch_size": 0}}',
                       "inf.toml": "budget_minutes = inf\n", "dev.toml": 'device = "meta"\n',
                       "sargs_list.json": '{"student_args": [1, 2]}', "aargs_str.json": '{"arch_args": "x"}'}.items():
        (d / name).write_text(text)
        f[Path(name).stem] = str(d / name)
    f["dir"] = str(d)
    return f


def _broken_teacher(path: Path, how: object) -> None:
    classes = how if isinstance(how, int) else 10
    m = make_teacher_module("lenet5") if classes == 10 else create("lenet5", **{**KWARGS, "num_classes": classes})
    spec = MNIST_SPEC
    if how == "nan":
        with torch.no_grad():
            m.classifier.weight.fill_(float("nan"))
    save_model(path, m, ModelFile("lenet5", {**KWARGS, "num_classes": classes}, spec, max(classes, 1)))
    if how == "std0":
        d = torch.load(path, weights_only=True)
        d["input_spec"]["std"] = [0.0]
        torch.save(d, path)


def _fixed_batch_export(path: Path) -> None:
    m = make_teacher_module("lenet5")
    ep = torch.export.export(m, (torch.zeros(2, 1, 32, 32),))
    torch.export.save(ep, str(path))


# --- the catalogue ---------------------------------------------------------------------------------------------
# Each case: (id, arguments after the command with {placeholders} from `files`, the needles of the error line).
# Every distill case writes to --out {out}; the folder must not exist afterwards.
DISTILL: list[tuple[str, list[str], tuple[str, ...]]] = [
    # 1. runs that never end
    ("s_steps_0", ["-p", "s_steps=0"], ("s_steps=0", "integer >= 1")),
    ("budget_nan", ["--budget-minutes", "nan"], ("--budget-minutes nan", "finite")),
    ("budget_inf", ["--budget-minutes", "inf"], ("--budget-minutes inf", "finite")),
    ("lr_nan", ["-p", "lr_s=NaN"], ("lr_s=nan", "finite number > 0")),
    ("lr_inf", ["-p", "lr_s=Infinity"], ("lr_s=inf", "finite")),
    # finite, and a traceback at the first step: float32 overflow (1e300), inside Adam's bias-corrected step (1e38)
    ("lr_past_float32", ["-p", "lr_s=1e300"], ("lr_s=1e+300", "at most 3.4e+38: the networks compute in float32")),
    ("lr_past_a_million", ["-p", "lr_g=1e38"], ("lr_g=1e+38", "> 0 and <= 1e+06")),
    ("int_past_float32", ["-p", f"batch_size={10**400}"], ("batch_size=1000", "at most 3.4e+38")),  # not inf
    ("mean_nan", ["--channels", "1", "--input-size", "32", "--mean", "nan"], ("--mean", "finite")),
    ("feature_weight_nan", ["--feature-loss", "at", "--feature-weight", "nan"], ("feature_weight",)),
    # a negative weight rewards features unlike the teacher's: it was taken without a word
    ("feature_weight_negative", ["--feature-loss", "at", "--feature-weight", "-1"], ("feature_weight=-1.0", ">= 0")),
    ("feature_weight_table_negative", ["--feature-loss", "at", "-p", 'feature_weight={{"at": -2}}'],
     ("feature_weight=", ">= 0, or a table of names to such numbers")),
    # 4. config files and -p values
    ("toml_negative_steps", ["--config", "{neg_steps}"], ("steps = -5", "integer >= 1")),
    ("toml_steps_string", ["--config", "{two}"], ("steps = 'two'", "integer")),
    ("toml_seed_string", ["--config", "{seed_abc}"], ("seed = 'abc'", "integer >= 0")),
    ("toml_ckpt_every_0", ["--config", "{ckpt0}"], ("ckpt_every = 0", ">= 1")),
    ("json_eval_every_0", ["--config", "{eval0}"], ("eval_every = 0", ">= 1")),
    ("json_budget_nan", ["--config", "{nan}"], ("budget_minutes = nan", "finite")),
    ("toml_budget_inf", ["--config", "{inf}"], ("budget_minutes = inf",)),
    ("toml_lr_string", ["--config", "{lr_abc}"], ("params.lr_s = 'abc'", "finite number > 0")),
    ("toml_params_not_table", ["--config", "{params5}"], ("params = 5", "table")),
    ("json_student_args_list", ["--config", "{sargs_list}"], ("student_args = [1, 2]", "table of names")),
    ("json_arch_args_string", ["--config", "{aargs_str}"], ("arch_args = 'x'", "table of names")),
    ("toml_unknown_key", ["--config", "{unknown}"], ("colour", "known")),
    ("json_top_level_list", ["--config", "{list}"], ("table of settings",)),
    ("toml_broken", ["--config", "{broken}"], ("cannot parse",)),
    ("toml_negative_seed", ["--config", "{seed_neg}"], ("seed = -1",)),
    ("toml_fid_samples_1", ["--config", "{fid1}"], ("fid_samples = 1", ">= 2")),
    ("toml_teachers_number", ["--config", "{teachers5}"], ("teachers = 5",)),
    ("json_batch_size_0", ["--config", "{bs0}"], ("params.batch_size = 0", ">= 1")),
    ("toml_device_meta", ["--config", "{dev}"], ("meta",)),
    ("config_missing", ["--config", "{dir}/nope.toml"], ("no such file",)),
    ("p_lr_string", ["-p", "lr_s=abc"], ("-p lr_s=abc", "finite number > 0")),
    ("p_lr_negative", ["-p", "lr_g=-1"], ("lr_g=-1", "> 0")),
    ("p_batch_size_0", ["-p", "batch_size=0"], ("batch_size=0", ">= 1")),
    ("p_batch_size_float", ["-p", "batch_size=8.5"], ("batch_size=8.5", "integer")),
    ("p_optimizer", ["-p", "s_optimizer=rmsprop"], ("s_optimizer=rmsprop", "'sgd', 'adam'")),
    ("p_schedule", ["-p", "schedule=linear"], ("schedule=linear", "'cosine'")),
    ("p_unknown", ["-p", "nosuchkey=1"], ("nosuchkey",)),
    ("p_milestones", ["-p", "milestones=[2]"], ("milestones", "<= 1")),
    ("p_momentum_bool", ["-p", "momentum=true"], ("momentum=True", "finite number")),
    ("p_temperature_0", ["-p", "T=0"], ("T=0", "> 0")),
    ("p_no_equals", ["-p", "lr_s"], ("KEY=VALUE",)),
    ("p_teacher_weights", ["-p", "teacher_weights=[-1]"], ("teacher_weights",)),
    # lists of the wrong length or order, and settings whose bounds were unchecked, gave tracebacks or ran
    ("p_betas_one", ["--method", "fast", "-p", "betas_g=[0.5]"], ("betas_g=[0.5]", "a list of 2", "< 1")),
    ("p_betas_one_auto", ["-p", "betas_g=[0.5]"], ("betas_g=[0.5]", "a list of 2")),
    ("p_beta_1", ["--method", "dafl", "-p", "betas_g=[0.5,1.0]"], ("betas_g=[0.5, 1.0]", "< 1")),
    ("p_betas_inv_empty", ["--method", "deepinversion", "-p", "betas_inv=[]"], ("betas_inv=[]", "a list of 2")),
    ("p_local_scale_order", ["--method", "cmi", "-p", "local_scale=[1.0,0.25]"], ("local_scale", "ascending")),
    ("p_is_maml", ["--method", "fast", "-p", "is_maml=2"], ("is_maml=2", "one of 0, 1")),
    ("p_heldout_negative", ["--method", "fast", "-p", "heldout_size=-3"], ("heldout_size=-3", ">= 1")),
    ("p_select_margin", ["--method", "fast", "-p", "select_margin=-5"], ("select_margin=-5", ">= 0")),
    ("p_watch_every", ["--method", "dfad", "-p", "watch_every=-1"], ("watch_every=-1", ">= 0")),
    # values no check looked at: tracebacks, or (ie_log_base=1) "training diverged ... lower the learning rates"
    ("p_head", ["--method", "dafl", "-p", "head=foo"], ("head=foo", "'tanh_bn', 'bn', 'sigmoid'")),
    ("p_init", ["--method", "deepinversion", "-p", "init=foo"], ("init=foo", "'randn', 'zeroq'")),
    ("p_augment", ["--method", "zskd", "-p", "augment=foo"], ("augment=foo", "'crop_flip'")),
    ("p_lr_meta", ["--method", "fast", "-p", "lr_meta=-1"], ("lr_meta=-1", "> 0")),
    ("p_ie_log_base_1", ["--method", "dafl", "-p", "ie_log_base=1"], ("ie_log_base=1", "other than 1")),
    ("p_ie_log_base_0", ["--method", "dafl", "-p", "ie_log_base=0"], ("ie_log_base=0", "a number > 0")),
    ("p_pool_dir", ["--method", "zeroq", "-p", "pool_dir=[1]"], ("pool_dir=[1]", "a non-empty string")),
    ("p_feature_loss_nested", ["--method", "dfad", "-p", "feature_loss=[[1]]"], ("feature_loss", "at, fitnet")),
    ("p_feature_weight_stray", ["--method", "dfad", "--feature-loss", "at", "-p", 'feature_weight={{"AT": 100}}'],
     ('feature_weight={"AT": 100}', "names AT, not an objective of this run (at;")),
    ("p_feature_weight_disc", ["--method", "dfad", "--discriminator", "logits", "-p",
                               'feature_weight={{"discriminator": 2}}'],
     ("names discriminator", "(none;", "the discriminator's weight is --disc-weight")),
    ("unknown_method", ["--method", "nosuch"], ("nosuch",)),
    # 6. flags that gave tracebacks
    ("seed_2_63", ["--seed", str(2**63)], ("--seed",)),
    ("seed_negative", ["--seed", "-1"], ("--seed",)),
    ("device_meta", ["--device", "meta"], ("--device meta", "cpu, cuda")),
    ("device_garbage", ["--device", "cuda:abc"], ("--device", "not a device")),
    ("std_zero_flag", ["--channels", "1", "--input-size", "32", "--std", "0"], ("--std 0", "> 0")),
    ("mean_two_for_one_channel", ["--channels", "1", "--input-size", "32", "--mean", "0.1", "--mean", "0.2",
                                  "--std", "0.3"],
     ("mean needs 1 value",)),
    # 5. broken teachers
    ("teacher_nan", ["--teacher", "{nan_teacher}"], ("non-finite",)),
    ("teacher_0_classes", ["--teacher", "{zero_class}"], ("0 class", "at least 2")),
    ("teacher_1_class", ["--teacher", "{one_class}"], ("1 class", "at least 2")),
    ("teacher_fixed_batch", ["--teacher", "{fixed_batch}", "--channels", "1", "--input-size", "32", "--mean", "0.1",
                             "--std", "0.3"],
     ("batch 3", "dynamic batch")),
    ("teacher_text", ["--teacher", "{text}"], ("not a readable PyTorch file",)),
    ("teacher_random_bytes", ["--teacher", "{rand}"], ("not a readable PyTorch file",)),
    ("teacher_empty", ["--teacher", "{empty}"], ("empty",)),
    ("teacher_folder", ["--teacher", "{dir}"], ("directory",)),
    ("teacher_missing", ["--teacher", "{dir}/nope.pt"], ("no such file",)),
    ("teacher_pickle4_untrusted", ["--teacher", "{pickle4}", "--channels", "1", "--input-size", "32", "--mean", "0",
                                   "--std", "1"],
     ("--trust-pickle",)),
    ("teacher_std0_in_file", ["--teacher", "{std0}"], ("file's input spec", "std")),
    # 8. data that does not belong
    ("eval_string_labels", ["--eval-data", "{strlab}"], ("integer class indices",)),
    ("eval_negative_labels", ["--eval-data", "{neglab}"], ("labels run -1..2",)),
    ("eval_nan_labels", ["--eval-data", "{nanlab}"], ("whole class indices", "nan")),
    ("eval_label_too_big", ["--eval-data", "{biglab}"], ("labels run 0..12", "10 classes")),
    ("eval_five_channels", ["--eval-data", "{five}"], ("5 channels",)),
    ("eval_text", ["--eval-data", "{text}"], ("not a readable .npz file (no zip of arrays",)),
    ("eval_empty_path", ["--eval-data", ""], ("--eval-data", "a non-empty string")),  # "must be a string" (it was)
]


def _fill(args: list[str], files: dict[str, str]) -> list[str]:
    return [a.format(**files) if "{" in a else a for a in args]


@pytest.mark.parametrize("case", DISTILL, ids=[c[0] for c in DISTILL])
def test_distill_refuses(case: tuple[str, list[str], tuple[str, ...]], files: dict[str, str], tmp_path: Path) -> None:
    _, args, needles = case
    out = tmp_path / "run"
    extra = [] if "--teacher" in args else ["--teacher", files["T"]]
    line = assert_refused(invoke(["distill", *extra, *_fill(args, files), "--steps", "1", "--out", out]),
                          *needles)
    assert "weights_only" not in line  # torch's advice to unpickle anyway is never passed on
    assert not out.exists(), "no run folder is left behind"


# --- --out: only new, empty, or a run (refused) -----------------------------------------------------------------
def _user_folder(tmp: Path) -> Path:
    d = tmp / "mine"
    d.mkdir()
    (d / "config.json").write_text('{"mine": 1}')
    return d


OUT_CASES: list[tuple[str, Callable[[Path], Path], tuple[str, ...]]] = [
    ("out_is_a_file", lambda t: (t / "f.txt", (t / "f.txt").write_text("mine"))[0], ("is a file",)),
    ("out_dev_null", lambda t: Path("/dev/null"), ("is a file",)),
    ("out_in_proc", lambda t: Path("/proc/dfkd-x"), ("cannot",)),
    ("out_under_a_file", lambda t: (t / "g.txt", (t / "g.txt").write_text("mine"))[0] / "run", ("is a file",)),
    ("out_user_folder", _user_folder, ("not empty", "config.json")),
    ("out_name_too_long", lambda t: t / ("r" * 300), ("File name too long; give a shorter name",)),  # a traceback
    ("out_dangling_link", lambda t: (t / "run", (t / "run").symlink_to(t / "unmounted" / "run"))[0],
     ("is a link to", "which does not exist")),  # "cannot create the folder (File exists)"
]


@pytest.mark.parametrize("case", OUT_CASES, ids=[c[0] for c in OUT_CASES])
def test_out_is_refused_and_user_files_kept(case, files: dict[str, str], tmp_path: Path) -> None:  # noqa: ANN001
    _, make, needles = case
    out = make(tmp_path)
    before = tree(tmp_path)
    assert_refused(invoke(["distill", "--teacher", files["T"], "--steps", "1", "--out", out, *QUICK]), *needles)
    assert tree(tmp_path) == before, "nothing of the user's changed"


# --- --resume: what may change, what may not ------------------------------------------------------------------
@pytest.fixture(scope="module")
def done_run(files: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("done") / "run"
    r = invoke(["distill", "--teacher", files["T"], "--method", "dfad", "--steps", "2", "--out", run, *QUICK])
    assert r.exit_code == 0, r.output
    return run


RESUME: list[tuple[str, list[str], tuple[str, ...]]] = [
    ("resume_method", ["--method", "dafl"], ("--method dafl", "would change the run")),
    ("resume_teacher", ["--teacher", "{nan_teacher}"], ("--teacher", "is not a teacher the run started with")),
    ("resume_student", ["--student", "lenet5"], ("--student lenet5",)),
    ("resume_seed", ["--seed", "3"], ("--seed 3",)),
    ("resume_out", ["--out", "{dir}/elsewhere"], ("--out",)),
    ("resume_setting", ["--fid-every", "7"], ("--fid-every 7",)),
    ("resume_config", ["--config", "{ckpt0}"], ("--config", "keeps its settings")),
    ("resume_finished", [], ("already finished",)),
    ("resume_steps_back", ["--steps", "1"], ("--steps 1", "finished at step 2")),
    ("resume_lr_nan", ["--steps", "4", "-p", "lr_s=NaN"], ("lr_s=nan",)),
    ("resume_budget_nan", ["--budget-minutes", "nan"], ("--budget-minutes nan",)),
    ("resume_device_meta", ["--steps", "4", "--device", "meta"], ("--device meta",)),
    ("resume_eval_bad", ["--steps", "4", "--eval-data", "{neglab}"], ("labels run -1..2",)),
]


@pytest.mark.parametrize("case", RESUME, ids=[c[0] for c in RESUME])
def test_resume_refuses_changes(case, files: dict[str, str], done_run: Path) -> None:  # noqa: ANN001
    _, args, needles = case
    before = tree(done_run)
    assert_refused(invoke(["distill", "--resume", done_run, *_fill(args, files)]), *needles)
    assert tree(done_run) == before, "the run is untouched"
    assert not Path(files["dir"], "elsewhere").exists()


def test_resume_of_a_run_whose_checkpoint_cannot_be_replaced_is_refused(files: dict[str, str], tmp_path: Path) -> None:
    # the folder's probe passed, the resumed run trained until its first checkpoint, then failed with its steps lost
    import subprocess

    run = tmp_path / "run"
    assert invoke(["distill", "--teacher", files["T"], "--method", "dfad", "--steps", "2", "--out", run,
                   *QUICK]).exit_code == 0
    if subprocess.run(["chattr", "+i", str(run / "checkpoint.pt")], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        assert_refused(invoke(["distill", "--resume", run, "--steps", "4"]), "its checkpoint.pt cannot be written",
                       "chattr -i")
    finally:
        subprocess.run(["chattr", "-i", str(run / "checkpoint.pt")], check=True)


def test_resume_not_a_run(files: dict[str, str], done_run: Path, tmp_path: Path) -> None:
    assert_refused(invoke(["distill", "--resume", done_run / "student.pt"]), "is a file, not a run folder")
    assert_refused(invoke(["distill", "--resume", done_run / "checkpoint.pt"]), f"its run folder is {done_run}")
    assert_refused(invoke(["distill", "--resume", files["text"]]), "is a file, not a run folder")
    assert_refused(invoke(["distill", "--resume", tmp_path / "nope"]), "no such run folder")
    assert_refused(invoke(["distill", "--resume", tmp_path]), "no checkpoint.pt")
    fake = tmp_path / "fake"
    fake.mkdir()
    shutil.copy(files["T"], fake / "checkpoint.pt")
    assert_refused(invoke(["distill", "--resume", fake]), "holds a dfkd model file, not a run checkpoint")
    assert sorted(p.name for p in fake.iterdir()) == ["checkpoint.pt"]


def test_resume_applies_budget_device_and_eval_data(done_run: Path, files: dict[str, str], eval_npz: str,
                                                    tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(done_run, run)
    r = invoke(["distill", "--resume", run, "--steps", "4", "--device", "cpu", "--eval-data", eval_npz,
                "--method", "dfad", "--teacher", files["T"]])
    assert r.exit_code == 0, r.output  # the same method and teacher are no change
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["finished"]
    assert ckpt["config"]["device"] == "cpu" and ckpt["config"]["eval_data"] == eval_npz
    assert "test top-1" in r.output


# --- other commands ---------------------------------------------------------------------------------------------
OTHER: list[tuple[str, list[str], tuple[str, ...]]] = [
    # names too long for the file, or for its parts folder beside it (tracebacks before)
    ("synth_out_too_long", ["synthesize", "--teacher", "{T}", "--method", "zskd", "--num", "4", "--out",
                            "{dir}/" + "t" * 300 + ".npz"], ("File name too long; give a shorter name",)),
    ("synth_parts_too_long", ["synthesize", "--teacher", "{T}", "--method", "zskd", "--num", "4", "--out",
                              "{dir}/" + "t" * 248 + ".npz"], ("the file name is 252 bytes", "shorter name")),
    ("synth_out_proc", ["synthesize", "--teacher", "{T}", "--method", "zskd", "--num", "4", "--out", "/proc/x/t.npz"],
     ("cannot write",)),
    ("synth_out_folder", ["synthesize", "--teacher", "{T}", "--method", "zskd", "--num", "4", "--out", "{dir}"],
     ("is a folder",)),
    ("synth_out_under_file", ["synthesize", "--teacher", "{T}", "--method", "zskd", "--num", "4", "--out",
                              "{text}/t.npz"], ("is a file, not a folder",)),
    ("synth_s_steps_negative", ["synthesize", "--teacher", "{T}", "--method", "zskd", "--num", "4", "-p",
                                "s_steps=-1", "--out", "{dir}/t.npz"], ("s_steps=-1", ">= 0")),
    ("synth_method_auto", ["synthesize", "--teacher", "{T}", "--method", "auto", "--num", "4", "--out",
                           "{dir}/t.npz"], ("--method auto: picks how `dfkd distill` trains", "zskd")),
    ("methods_recipe_alone", ["methods", "--recipe", "cpu"], ("--recipe goes with --params NAME",)),
    ("synth_seed_huge", ["synthesize", "--teacher", "{T}", "--method", "zskd", "--num", "4", "--seed",
                         str(2**64), "--out", "{dir}/t.npz"], ("--seed",)),
    ("train_teacher_out_under_file", ["train-teacher", "--data", "{biglab}", "--arch", "lenet5", "--out",
                                      "{text}/t.pt"], ("is a file, not a folder",)),
    ("train_teacher_out_dev_null", ["train-teacher", "--data", "{biglab}", "--arch", "lenet5", "--out",
                                    "/dev/null"], ("not a regular file",)),
    ("fid_stats_out_proc", ["fid-stats", "{biglab}", "/proc/x.npz", "--features", "teacher", "--teacher", "{T}"],
     ("cannot write",)),
    ("synth_out_exists", ["synthesize", "--teacher", "{T}", "--method", "zskd", "--num", "4", "--out", "{text}"],
     ("already exists", "--force")),
    ("train_teacher_out_exists", ["train-teacher", "--data", "{biglab}", "--arch", "lenet5", "--out", "{text}"],
     ("already exists", "--force")),
    ("fid_stats_out_exists", ["fid-stats", "{biglab}", "{text}", "--features", "teacher", "--teacher", "{T}"],
     ("already exists", "--force")),
    ("evaluate_text_model", ["evaluate", "--model", "{text}", "--data", "{biglab}"], ("not a readable",)),
    ("evaluate_string_labels", ["evaluate", "--model", "{T}", "--data", "{strlab}"], ("integer class indices",)),
    ("evaluate_device_meta", ["evaluate", "--model", "{T}", "--data", "{biglab}", "--device", "meta"],
     ("--device meta",)),
    ("report_missing", ["report", "{dir}/nope"], ("nope: no such run folder",)),
    # `--out newdir/` wrote a file named newdir; a 250-byte name failed after the work, at its temporary name
    ("synth_out_trailing_slash", ["synthesize", "--teacher", "{T}", "--method", "zskd", "--num", "4", "--out",
                                  "{dir}/new/"], ("names a folder (it ends in a slash)",)),
    ("train_teacher_out_long_name", ["train-teacher", "--data", "{biglab}", "--arch", "lenet5", "--out",
                                     "{dir}/" + "n" * 247 + ".pt"], ("the file name is 250 bytes", "shorter name")),
    ("export_out_dangling_link", ["export", "{T}", "--format", "torchscript", "--out", "{dir}/dangling.pt"],
     ("is a link to", "which does not exist")),
]


@pytest.mark.parametrize("case", OTHER, ids=[c[0] for c in OTHER])
def test_other_commands_refuse(case, files: dict[str, str]) -> None:  # noqa: ANN001
    _, args, needles = case
    before = tree(Path(files["dir"]))
    assert_refused(invoke(_fill(args, files)), *needles)
    assert tree(Path(files["dir"])) == before, "no file written or changed"


def test_force_replaces_an_existing_output(teacher_file: str, eval_npz: str, tmp_path: Path) -> None:
    out = tmp_path / "stats.npz"
    out.write_text("the user's file")
    assert_refused(invoke(["fid-stats", eval_npz, out, "--features", "teacher", "--teacher", teacher_file]),
                   "already exists")
    assert out.read_text() == "the user's file"
    r = invoke(["fid-stats", eval_npz, out, "--features", "teacher", "--teacher", teacher_file, "--force"])
    assert r.exit_code == 0, r.output
    assert set(np.load(out)) >= {"mu", "sigma"}


def test_a_file_that_appears_at_out_while_the_work_runs_is_kept(teacher_file: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # the start's check was all: two synthesize runs on one --out both said "wrote", and the last one won
    out = tmp_path / "t.npz"
    assemble = transfer_parts.Parts.assemble

    def meanwhile(self, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        out.write_text("the other run's file")
        assemble(self, *args, **kwargs)

    monkeypatch.setattr(transfer_parts.Parts, "assemble", meanwhile)
    args = ["synthesize", "--teacher", teacher_file, "--method", "zskd", "--num", "4", "-p", "s_steps=0", "-p",
            "di_iters=1", "-p", "di_batch=4", "--out", out]
    assert_refused(invoke(args), "a file appeared there while this ran", "this result was not written")
    assert out.read_text() == "the other run's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.npz", "t.npz.parts"]  # no hidden temporary left
    out.unlink()
    monkeypatch.setattr(transfer_parts.Parts, "assemble", assemble)
    r = invoke(args)  # the images of the parts, not made again
    assert r.exit_code == 0 and len(np.load(out)["x"]) == 4, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.npz"]


def test_fid_stats_and_extend_keep_a_file_that_appears_at_their_output(tmp_path: Path) -> None:
    # both replaced it at their final move, exit 0 and "wrote"
    from dfkd.fid import FIDStats
    from dfkd.io import atomic_copy

    out = tmp_path / "stats.npz"
    out.write_text("the user's file")
    stats = FIDStats(np.zeros(2), np.eye(2), "teacher")
    with pytest.raises(DfkdError, match="a file appeared there while this ran"):
        stats.save(out, replace=False)
    with pytest.raises(DfkdError, match="a file appeared there while this ran"):
        atomic_copy(tmp_path / "stats.npz", out, replace=False)  # extend's copy of its model to --out
    assert out.read_text() == "the user's file" and sorted(p.name for p in tmp_path.iterdir()) == ["stats.npz"]
    stats.save(out)  # --force
    assert set(np.load(out)) >= {"mu", "sigma"}


def test_a_sigterm_while_synthesize_writes_leaves_no_partial_file(teacher_file: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # `kill` ended the process on the spot: its hidden .t.npz.PID.tmp, as large as the data, stayed for good
    import os
    import signal

    out = tmp_path / "t.npz"
    stream = transfer_parts._stream

    def killed(*args, **kwargs) -> None:  # noqa: ANN002, ANN003
        stream(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(transfer_parts, "_stream", killed)
    (tmp_path / ".t.npz.999999.tmp").write_bytes(b"a killed run's")  # kill -9: no handler runs
    args = ["synthesize", "--teacher", teacher_file, "--method", "zskd", "--num", "4", "-p", "s_steps=0", "-p",
            "di_iters=1", "-p", "di_batch=4", "--out", out]
    r = invoke(args)
    assert r.exit_code == 128 + signal.SIGTERM and "interrupted by SIGTERM" in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.npz.parts"]  # the images, to write the file from
    monkeypatch.setattr(transfer_parts, "_stream", stream)
    assert invoke(args).exit_code == 0 and len(np.load(out)["x"]) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.npz"]


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"method": "dfad"}')
    assert_refused(invoke(["report", tmp_path]), "not a dfkd run folder")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss/x": 1.0}\n')
    (tmp_path / "config.json").write_text("{not json")
    assert_refused(invoke(["report", tmp_path]), "config.json", "not valid JSON")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "metrics.jsonl"]


def test_trusted_protocol_4_pickle_loads(files: dict[str, str], tmp_path: Path) -> None:
    r = invoke(["distill", "--teacher", files["pickle4"], "--trust-pickle", "--channels", "1", "--input-size", "32",
                "--mean", "0", "--std", "1", "--student", "lenet5_half", "--steps", "2", "--out", tmp_path / "run",
                *QUICK])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "student.pt").is_file()


def test_only_the_typed_flag_lets_a_pickle_be_unpickled(files: dict[str, str], tmp_path: Path) -> None:
    # a --config file or a handed-over run folder's checkpoint set trust_pickle, and dfkd unpickled the teacher
    spec = ["--channels", "1", "--input-size", "32", "--mean", "0", "--std", "1", "--student", "lenet5_half"]
    config = tmp_path / "trust.json"
    config.write_text('{"trust_pickle": true}')
    assert_refused(invoke(["distill", "--config", config, "--teacher", files["pickle4"], *spec, "--steps", "2",
                           "--out", tmp_path / "cfg", *QUICK]), "trust_pickle = true", "--trust-pickle flag")
    assert not (tmp_path / "cfg").exists()
    r = invoke(["distill", "--teacher", files["pickle4"], "--trust-pickle", *spec, "--steps", "2",
                "--out", tmp_path / "run", *QUICK])
    assert r.exit_code == 0, r.output
    assert_refused(invoke(["distill", "--resume", tmp_path / "run", "--steps", "3"]),
                   "cannot grant", f"distill --resume {tmp_path / 'run'} --trust-pickle")
    r = invoke(["distill", "--resume", tmp_path / "run", "--steps", "3", "--trust-pickle"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["steps"] == 3


def test_float_labels_are_read_with_a_warning(files: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "float.npz"
    np.savez(path, x=np.zeros((4, 28, 28), np.uint8), y=np.array([0.0, 1.0, 2.0, 3.0]))
    with pytest.warns(UserWarning, match="stored as float64; read as integer"):
        r = invoke(["evaluate", "--model", files["T"], "--data", path, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["n"] == 4


def test_input_size_flag_overriding_the_file_warns(teacher_file: str) -> None:
    from dfkd.teacher import load_teacher

    spec = type(MNIST_SPEC)(1, 36, (0.5,), (0.5,))
    with pytest.warns(UserWarning, match="declares 1x32x32 inputs; --channels/--input-size make it 1x36x36"):
        load_teacher(teacher_file, spec=spec)


@pytest.mark.parametrize("command", [["evaluate", "--model", "{T}", "--data", ""],
                                     ["synthesize", "--teacher", "{T}", "--method", "zskd", "--num", "2",
                                      "--eval-data", "", "--out", "{dir}/t.npz"]])
def test_an_empty_data_path_is_refused(command: list[str], files: dict[str, str], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Path("") is the working folder: it was read as an image folder (top-1 100.00% of whatever lay there)
    for c in "ab":
        (tmp_path / c).mkdir()
        Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / c / "x.png")
    monkeypatch.chdir(tmp_path)
    assert_refused(invoke(_fill(command, {**files, "dir": str(tmp_path)})), "an empty path")
    assert not (tmp_path / "t.npz").exists()


def test_a_runs_own_config_json_runs_again(files: dict[str, str], tmp_path: Path) -> None:
    # refused: "auto_choice is recorded by a run of --method auto", of a dfad run whose file holds auto_choice null
    r = invoke(["distill", "--teacher", files["T"], "--method", "dfad", "--steps", "2", "--out", tmp_path / "a",
                *QUICK])
    assert r.exit_code == 0, r.output
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = invoke(["distill", "--config", tmp_path / "a" / "config.json", "--out", tmp_path / "b"])
    assert r.exit_code == 0 and "auto_choice" not in r.output, r.output
    said = [str(w.message) for w in caught]
    assert not [m for m in said if "has no effect" in m or "auto_choice" in m], said  # the recipe's own values
    assert "lr_s = 0.002 (paper: 0.01; cpu recipe)" in r.output, r.output  # it said "set by you"
    # a value typed with -p is the user's, whatever the recipe holds: it still has no effect with an Adam student
    # a file's "clip_s": null (the recipe's own value) was dropped, and the automatic clip came back
    (tmp_path / "noclip.json").write_text('{"params": {"clip_s": null}}')
    r = invoke(["distill", "--config", tmp_path / "noclip.json", "--teacher", files["T"], "--method", "dafl",
                "--steps", "2", *QUICK, "--out", tmp_path / "d"])
    assert r.exit_code == 0 and json.loads((tmp_path / "d" / "config.json").read_text())["params"]["clip_s"] is None
    with pytest.warns(UserWarning, match=r"-p momentum=0.9 has no effect"):
        r = invoke(["distill", "--config", tmp_path / "a" / "config.json", "-p", "momentum=0.9", "--out",
                    tmp_path / "c"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "b" / "config.json").read_text())["method"] == "dfad"
    # a run's config.json (its weights written out for its feature loss) with another --feature-loss: the file's
    # weights of the other objective are warned of (refused, as if typed with -p), and such an older run resumes
    r = invoke(["distill", "--teacher", files["T"], "--method", "dfad", "--feature-loss", "at", "--steps", "2",
                "--out", tmp_path / "at", *QUICK])
    assert r.exit_code == 0, r.output
    with pytest.warns(UserWarning, match=r"config.json: params.feature_weight=\{\"at\": 500.0\} names at, not an "
                                         r"objective of this run \(rkd;"):
        r = invoke(["distill", "--config", tmp_path / "at" / "config.json", "--feature-loss", "rkd", "--steps", "4",
                    "--out", tmp_path / "rkd"])
    assert r.exit_code == 0, r.output
    assert invoke(["distill", "--resume", tmp_path / "rkd", "--steps", "6"]).exit_code == 0
    # a value of a config file is named as the file's, not as a -p the user never typed
    (tmp_path / "momentum.json").write_text('{"params": {"momentum": 0.5}}')
    with pytest.warns(UserWarning, match=r"^--config's momentum=0.5 has no effect"):
        r = invoke(["distill", "--config", tmp_path / "momentum.json", "--teacher", files["T"], "--method", "dfq",
                    "--steps", "2", *QUICK, "--out", tmp_path / "e"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_run_stopped_by_a_signal_exits_with_128_plus_its_number(signum: str, teacher_file: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  stop_signals_heard: None) -> None:
    # distill, search and extend stopped at a boundary exited 130 on SIGTERM, where every other command exits 143
    import signal

    number = getattr(signal, signum)
    stop_in_round(monkeypatch, "dfad", 2, number)
    monkeypatch.setenv("RANK", "1")  # a batch system's, for one process: the stop was not said, as by a quiet rank
    r = invoke(["distill", "--teacher", teacher_file, "--method", "dfad", "--steps", "40", *QUICK, "--out",
                tmp_path / "r"])
    assert r.exit_code == 128 + number and "stopped at step 4; checkpoint saved" in r.output, r.output
    # the search's own message, with the status of the signal that stopped it
    monkeypatch.setattr("dfkd.search.search", lambda *a, **k: signal.raise_signal(number))
    r = invoke(["search", "--teacher", teacher_file, "--method", "kd", "--eval-data", tmp_path / "unread.npz",
                "--max-params", "1000", "--out", tmp_path / "s"])
    assert r.exit_code == 128 + number and "continue the search with the same command and --resume" in r.output


@pytest.mark.parametrize("rank", ["0", "1"])
def test_commands_but_distill_are_refused_under_torchrun(rank: str, teacher_file: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # each process ran the whole command towards one output: its twin held the lock ("process N is making this
    # file"), and torchrun stopped the first, leaving its half-made output
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    out = tmp_path / "t.npz"
    r = invoke(["synthesize", "--teacher", teacher_file, "--method", "dfad", "--num", "4", "--out", out])
    if rank == "0":
        assert_refused(r, "dfkd synthesize runs as one process; under torchrun (WORLD_SIZE=2) only dfkd distill")
    else:  # said once, by process 0
        assert r.exit_code == 2 and r.output == ""
    assert list(tmp_path.iterdir()) == []


def test_a_second_stop_under_torchrun_is_said_by_process_0_alone(monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # "interrupted: stopped at once at step 300 ..." was printed once per process
    @friendly
    def stopped_at_once() -> None:
        raise KeyboardInterrupt("stopped at once at step 300; the last checkpoint is at step 250")

    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, said in (("1", ""), ("0", "interrupted: stopped at once at step 300; the last checkpoint is at step "
                                        "250\n")):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as e:
            stopped_at_once()
        assert e.value.code == 130 and capsys.readouterr().err == said


def test_a_command_out_of_memory_says_so_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    # an allocation that failed (the CPU allocator's RuntimeError, a GPU's OutOfMemoryError) ended in a traceback;
    # another RuntimeError is not dressed up as one
    for error, said in ((RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 3221225472 "
                                      "bytes. Error code 12"), "error: out of memory (3.0 GiB asked for at once): "),
                        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), "error: out of GPU: ")):
        @friendly
        def runs_out() -> None:
            raise error  # noqa: B023

        with pytest.raises(SystemExit) as e:
            runs_out()
        assert e.value.code == 2 and capsys.readouterr().err.startswith(said)

    @friendly
    def fails() -> None:
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        fails()


def test_fid_settings_that_give_no_fid_are_said(teacher_file: str, tmp_path: Path) -> None:
    # --fid-ref with --fid-every 0: the file was not even opened and no FID was logged; a teacher without BatchNorm
    # logged no FID either, unsaid
    args = ["distill", "--method", "dfad", "--steps", "2", *QUICK, "--eval-every", "1000"]
    with pytest.warns(UserWarning, match="--fid-ref .*none.npz has no effect: --fid-every 0 turns FID monitoring "
                                         "off"):
        r = invoke([*args, "--teacher", teacher_file, "--fid-ref", tmp_path / "none.npz", "--fid-every", "0",
                    "--out", tmp_path / "a"])
    assert r.exit_code == 0 and "FID: none" not in r.output, r.output
    plain = Path(__file__).resolve().parents[1] / "examples" / "mnist_lenet5.pt"
    r = invoke([*args, "--teacher", plain, "--out", tmp_path / "b"])
    assert r.exit_code == 0 and "FID: none (the teacher has no BatchNorm layer for the data-free BN-FID; --fid-ref " \
                                "STATS.npz" in r.output, r.output


def test_eval_data_that_is_the_training_data_is_said(tmp_path: Path) -> None:
    # kd --data X --eval-data X (or a byte copy) printed "test top-1 79.35%": training accuracy, unsaid
    x, y = np.random.default_rng(0).integers(0, 255, (16, 28, 28), dtype=np.uint8), np.arange(16) % 10
    np.savez(tmp_path / "train.npz", x=x, y=y)
    shutil.copy(tmp_path / "train.npz", tmp_path / "copy.npz")
    np.savez(tmp_path / "other.npz", x=x[::-1], y=y)
    plain = Path(__file__).resolve().parents[1] / "examples" / "mnist_lenet5.pt"
    args = ["distill", "--teacher", plain, "--method", "kd", "--data", tmp_path / "train.npz", "--steps", "1",
            "-p", "batch_size=8"]
    for test in ("train.npz", "copy.npz"):
        with pytest.warns(UserWarning, match=f"--eval-data .*{test} is the --data the student trains on: its "
                                             "top-1 there is training accuracy"):
            assert invoke([*args, "--eval-data", tmp_path / test, "--out", tmp_path / test[:-4]]).exit_code == 0
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert invoke([*args, "--eval-data", tmp_path / "other.npz", "--out", tmp_path / "o"]).exit_code == 0
    assert not [w for w in seen if "is the --data" in str(w.message)]


def test_a_transfer_file_of_fewer_images_than_classes_is_said(teacher_file: str, tmp_path: Path) -> None:
    # synthesize --num 1 on a 10-class teacher: a file a student then learnt nothing from (10.85 %), unsaid
    with pytest.warns(UserWarning, match=r"--num 4: fewer images than the teacher's 10 classes, so some classes "
                                         r"cannot appear in the file; give --num 10000 \(the default\)"):
        r = invoke(["synthesize", "--teacher", teacher_file, "--method", "zskd", "--num", "4", "-p", "di_iters=1",
                    "-p", "di_batch=4", "--out", tmp_path / "t.npz"])
    assert r.exit_code == 0, r.output
    r = invoke(["distill", "--transfer-data", tmp_path / "t.npz", "--teacher", teacher_file, "--steps", "1", "-p",
                "batch_size=8", "--out", tmp_path / "r"])  # each batch of 8 drew the 4 images twice, unsaid
    assert r.exit_code == 0 and f"--transfer-data {tmp_path / 't.npz'}: 4 images, fewer than a batch (-p " \
                                "batch_size=8): each batch repeats them" in r.output, r.output


def test_training_images_of_another_size_are_said(tmp_path: Path) -> None:
    # kd --data of 28x56 images was stretched to the teacher's 32x32 (half the top-1), said for --eval-data alone
    x, y = np.random.default_rng(0).integers(0, 255, (16, 28, 56), dtype=np.uint8), np.arange(16) % 10
    np.savez(tmp_path / "wide.npz", x=x, y=y)
    plain = Path(__file__).resolve().parents[1] / "examples" / "mnist_lenet5.pt"
    r = invoke(["distill", "--teacher", plain, "--method", "kd", "--data", tmp_path / "wide.npz", "--steps", "1",
                "-p", "batch_size=8", "--out", tmp_path / "r"])
    assert r.exit_code == 0 and f"--data {tmp_path / 'wide.npz'}: its images are 28x56 stretched to 32x32 for the " \
                                "teacher" in r.output, r.output
    assert "fewer than a batch" not in r.output  # 16 images, batch 8
    r = invoke(["distill", "--teacher", plain, "--method", "kd", "--data", tmp_path / "wide.npz", "--steps", "1",
                "-p", "batch_size=32", "--out", tmp_path / "r2"])  # the same 16 images every step, unsaid
    assert r.exit_code == 0 and f"--data {tmp_path / 'wide.npz'}: 16 images, fewer than a batch (-p batch_size=32): " \
                                "every step trains on all of them" in r.output, r.output
