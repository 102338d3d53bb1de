"""Hypothesis fuzz of the config loader and the `distill` command line.

Properties: a config either resolves to settings that pass every check or is refused with a DfkdError (never
another exception); the command exits 0 or 2 with no traceback, within a time limit, and leaves either a finished
run of exactly --steps steps or no run that looks finished.
"""

from __future__ import annotations

import json
import signal
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dfkd.cli.main import main
from dfkd.config import build_config, read_config_file
from dfkd.engine import check_config
from dfkd.errors import DfkdError
from dfkd.validate import FIELDS

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
given, settings, HealthCheck = hypothesis.given, hypothesis.settings, hypothesis.HealthCheck

PARAM_KEYS = ["lr_s", "lr_g", "batch_size", "s_steps", "g_steps", "T", "momentum", "s_optimizer", "schedule",
              "milestones", "weight_decay", "nz", "gamma", "nosuchkey"]
SMALL_INTS = st.integers(-3, 12)
VALUES = st.one_of(SMALL_INTS, st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                   st.none(), st.text(max_size=6), st.lists(st.one_of(SMALL_INTS, st.floats(-2, 2)), max_size=3))


def _bounded(key: str, value: object) -> object:
    """Keep sizes that would make a valid run big (batch, latent width) small; every other value as drawn."""
    if key in ("batch_size", "nz", "g_steps") and isinstance(value, int) and not isinstance(value, bool) and \
            value > 16:
        return 16  # a user may ask for 10**20 generator steps a round; a fuzz example may not
    return value


@st.composite
def configs(draw: st.DrawFn) -> dict:
    keys = draw(st.lists(st.sampled_from([*sorted(FIELDS), "unknown_key"]), max_size=5, unique=True))
    data = {k: draw(VALUES) for k in keys if k != "params"}
    if draw(st.booleans()):
        data["params"] = draw(st.one_of(VALUES, st.dictionaries(st.sampled_from(PARAM_KEYS), VALUES, max_size=3)))
    return data


def _param_text(key: str, value: object) -> str:
    return f"{key}={value if isinstance(value, str) else json.dumps(_bounded(key, value))}"


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=configs(), params=st.lists(st.tuples(st.sampled_from(PARAM_KEYS), VALUES), max_size=3),
       suffix=st.sampled_from([".json", ".toml"]))
def test_config_loader_refuses_or_resolves(data: dict, params: list, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"c{suffix}"
        path.write_text(json.dumps(data) if suffix == ".json" else _toml(data))
        try:
            cfg = build_config(str(path), [_param_text(k, v) for k, v in params], teachers=("t.pt",))
        except DfkdError as e:
            assert "\n" not in str(e)
            return
        check_config(cfg)  # what the loader accepts, the run accepts


@settings(max_examples=100, deadline=None, derandomize=True)
@given(text=st.text(max_size=60), suffix=st.sampled_from([".json", ".toml"]))
def test_any_config_text_is_read_or_refused(text: str, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"c{suffix}"
        path.write_text(text)
        try:
            assert isinstance(read_config_file(path), dict)
        except DfkdError:
            pass


def _toml(data: dict) -> str:
    """A TOML rendering of flat values (what tomllib cannot express is left out, as a user could not write it)."""
    lines, tables = [], []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append(f"[{k}]\n" + "".join(f"{a} = {_toml_value(b)}\n" for a, b in v.items()
                                                if _toml_value(b) is not None))
        elif _toml_value(v) is not None:
            lines.append(f"{k} = {_toml_value(v)}\n")
    return "".join(lines) + "".join(tables)


def _toml_value(v: object) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v == float("inf") else "-inf" if v == float("-inf") else repr(v))
    if isinstance(v, (int, str)):
        return json.dumps(v)
    if isinstance(v, list):
        parts = [_toml_value(a) for a in v]
        return None if None in parts else "[" + ", ".join(parts) + "]"
    return None


class Hang(Exception):
    """One example ran past its time limit."""


def _alarm(signum: int, frame: object) -> None:
    raise Hang


FLAGS = {
    "--steps": st.one_of(st.integers(-2, 3), st.text(max_size=3)),
    "--budget-minutes": st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.just("0.001")),
    "--seed": st.one_of(st.integers(-2, 3), st.integers(2**62, 2**64)),
    "--device": st.sampled_from(["cpu", "auto", "meta", "cuda:x", "", "cpu:0"]),
    "--eval-every": SMALL_INTS, "--fid-every": SMALL_INTS, "--student": st.sampled_from(["lenet5_half", "nope"]),
    "--method": st.sampled_from(["dfad", "dafl", "nope"]),
}


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                                   HealthCheck.data_too_large])
@given(flags=st.dictionaries(st.sampled_from(sorted(FLAGS)), st.none(), max_size=4).flatmap(
           lambda d: st.fixed_dictionaries({k: FLAGS[k] for k in d})),
       params=st.lists(st.tuples(st.sampled_from(PARAM_KEYS), VALUES), max_size=3))
def test_distill_command_line_exits_0_or_2(teacher_file: str, flags: dict, params: list) -> None:
    flags.setdefault("--steps", 2)  # a budget always: the default 10 minutes is no fuzz example
    args = ["distill", "--teacher", teacher_file, "-p", "batch_size=8", "-p", "nz=8"]
    for k, v in flags.items():
        args += [k, str(v)]
    for k, v in params:
        args += ["-p", _param_text(k, v)]
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "run"
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(60)
        try:
            result = CliRunner().invoke(main, [*args, "--out", str(out)])
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        assert not isinstance(result.exception, Hang), f"ran past 60 s: {args}"
        assert result.exit_code in (0, 2), (args, result.output, result.exception)
        assert "Traceback" not in result.output
        if result.exit_code == 0:
            ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
            assert ckpt["finished"] and (out / "student.pt").is_file()
            if str(flags["--steps"]).isdigit() and "--budget-minutes" not in flags:
                assert ckpt["step"] == int(flags["--steps"]), "--steps N means exactly N student steps"
        else:
            assert not (out / "student.pt").exists(), "a refused run does not look finished"


@settings(max_examples=200, deadline=None, derandomize=True)
@given(value=st.one_of(st.text(max_size=12), st.integers(), st.lists(st.one_of(SMALL_INTS, st.text(max_size=3),
                                                                                st.floats(-2, 40)), max_size=3)))
def test_an_input_size_parses_to_a_side_or_a_pair_or_is_refused(value: object) -> None:
    from dfkd.spec import parse_size

    try:
        size = parse_size(value)
    except DfkdError as e:
        assert "HxW" in str(e) and "\n" not in str(e)
        return
    assert isinstance(size, int) or (len(size) == 2 and all(isinstance(a, int) for a in size) and
                                     size[0] != size[1])
