"""The resolved settings of a distillation run: defaults < method recipe < config file < command line."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from dfkd.errors import DfkdError
from dfkd.spec import parse_size
from dfkd.utils import pick_device
from dfkd.validate import check_params, check_settings

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as the `tomli` package
    import tomli as tomllib  # type: ignore[no-redef]


@dataclass(frozen=True)
class DistillConfig:
    """Every setting of `dfkd distill`. Method hyper-parameters live in `params` (see `dfkd methods --params`).

    `params` holds overrides until the run resolves it against the method's recipe for the loaded teacher; the
    run's config.json holds the resolved values.
    """

    method: str = "auto"  # dfkd.auto: the run replaces it with the method it picks for the teacher
    teachers: tuple[str, ...] = ()
    teacher_arch: str | None = None
    arch_args: dict[str, Any] = field(default_factory=dict)  # --arch-arg KEY=VALUE: teacher constructor arguments
    trust_pickle: bool = False
    channels: int | None = None
    input_size: int | tuple[int, int] | None = None  # pixels: a side, or (height, width) for non-square inputs
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    student: str | None = None
    student_args: dict[str, Any] = field(default_factory=dict)  # --student-arg KEY=VALUE
    student_init: str = "auto"  # the teacher's sliced weights where the student fits in it (dfkd.inherit), or random
    steps: int | None = None
    budget_minutes: float | None = None
    budget_clock: str = "wall"  # "cpu": --budget-minutes counts this process's CPU time (fair on a shared machine)
    eval_data: str | None = None
    eval_every: int = 500
    log_every: int = 10
    image_every: int = 250
    ckpt_every: int = 250
    fid_ref: str | None = None
    fid_every: int = 500  # 0: no FID monitoring
    fid_samples: int = 256
    transfer_data: str | None = None
    data: str | None = None  # real training images, for --method kd (real-data mode)
    quantize: str | None = None  # "int8": quantization-aware distillation (dfkd.qat)
    precision: str = "auto"  # fp32, bf16, fp16 or auto (dfkd.precision)
    compile: bool = False  # torch.compile the teacher, student and generator
    deterministic: bool = False  # reproducible GPU kernels: resumes bit-equal on a GPU (dfkd.precision)
    seed: int = 0
    device: str = "auto"
    out: str | None = None
    runs_dir: str = "runs"
    params: dict[str, Any] = field(default_factory=dict)
    auto_choice: dict[str, Any] | None = None  # set by the run: what --method auto measured and chose (dfkd.auto)
    #: The `params` keys a --config file gave and no -p overrode (not a setting: never written to config.json).
    #: One the method's recipe holds anyway changes nothing and is not the user's (a run's own config.json holds
    #: every resolved setting).
    from_file: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("from_file")
        for k in ("teachers", "mean", "std", "input_size"):
            if isinstance(d[k], (list, tuple)):
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> DistillConfig:
        known = {f.name for f in fields(cls)} - {"from_file"}
        unknown = sorted(set(d) - known)
        if unknown:
            params = sorted(set(unknown) & method_settings())
            hint = f"; method settings such as {', '.join(params)} go under params (JSON: \"params\": {{...}}; " \
                "TOML: a [params] table)" if params else ""
            raise DfkdError(f"{source}: unknown setting(s) {unknown}{hint}; known: {sorted(known)}")
        d = dict(d)
        for k in ("teachers", "mean", "std"):
            if d.get(k) is not None:
                d[k] = tuple(d[k]) if isinstance(d[k], (list, tuple)) else (d[k],)
        if isinstance(d.get("input_size"), (list, tuple)):  # [height, width] in JSON; a square pair is one side
            d["input_size"] = parse_size(d["input_size"])
        return cls(**d)


def method_settings() -> set[str]:
    """Every method's hyper-parameter names (`dfkd methods --params`), for a config file that put one at the top."""
    from dfkd.methods import get_method, list_methods

    return {k for name in list_methods() for k in get_method(name).default_params(None)}


#: Settings that name an architecture: as `module:callable` the run imports and calls it.
ARCH_SETTINGS = ("teacher_arch", "student")


def check_file_archs(data: dict[str, Any], source: str) -> None:
    """Refuse an architecture a file names that is a function of the standard library or an installed package.

    `--teacher-arch` and `--student` typed on the command line may name any `module:callable` (the user chose
    it). Read from a --config file or a run's checkpoint they are held to the rule of model files
    (`dfkd.archs.build_model(trusted=False)`): an nn.Module class, or a function of the user's own code, so a file
    handed over cannot make dfkd call `os:system`.
    """
    from dfkd.archs import arch_kind, import_callable

    for key in ARCH_SETTINGS:
        value = data.get(key)
        if isinstance(value, str) and arch_kind(value) == "module":
            import_callable(value, f"{source}: {key}", trusted=False)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A .json or .toml file of DistillConfig fields (method hyper-parameters under `params`)."""
    p = Path(path)
    if p.is_dir():
        raise DfkdError(f"--config {p}: is a folder; give the JSON or TOML file of settings")
    if not p.is_file():
        raise DfkdError(f"--config {p}: no such file")
    try:
        data = tomllib.loads(p.read_text()) if p.suffix == ".toml" else json.loads(p.read_text())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DfkdError(f"--config {p}: cannot parse it ({msg}); use JSON or TOML (.toml)") from None
    except OSError as e:
        raise DfkdError(f"--config {p}: cannot read it ({e.strerror})") from None
    if not isinstance(data, dict):
        raise DfkdError(f"--config {p}: expected a table of settings at the top level")
    return data


def parse_param(text: str) -> tuple[str, Any]:
    """`-p key=value`: the value is read as JSON when it parses (numbers, lists, true/false/null), else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise DfkdError(f"-p {text!r}: expected KEY=VALUE, e.g. -p lr_g=0.001")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def build_config(config_file: str | None = None, params: list[str] | tuple[str, ...] = (),
                 **flags: Any) -> DistillConfig:
    """Merge a config file and command-line flags (flags win; a flag left as None or empty does not count)."""
    data = read_config_file(config_file) if config_file else {}
    source = f"--config {config_file}"
    file_params = data.pop("params", None) or {}
    if not isinstance(file_params, dict):
        raise DfkdError(f"{source}: params = {file_params!r}: must be a table of method hyper-parameters")
    check_settings(data, source)
    check_file_archs({k: v for k, v in data.items() if flags.get(k) is None}, source)  # a flag given wins
    if isinstance(data.get("device"), str) and flags.get("device") is None:  # named --device before
        pick_device(data["device"], f"{source}: device =")
    if data.get("trust_pickle") and not flags.get("trust_pickle"):
        raise DfkdError(f"{source}: trust_pickle = true: only the --trust-pickle flag typed on the command line lets "
                        "dfkd unpickle a file (it runs the file's code); drop it from the file and add the flag")
    if data.pop("auto_choice", None) is not None:  # a run's own config.json records it (null where not auto)
        warnings.warn(f"{source}: auto_choice (what --method auto chose in the run the file comes from) is not a "
                      f"setting; ignored: this run uses the file's method {data.get('method', 'auto')!r}",
                      stacklevel=2)
    cli_params = dict(parse_param(text) for text in params)
    given = {k: v for k, v in flags.items()
             if not (v is None or (isinstance(v, (tuple, list)) and not v) or (k == "trust_pickle" and not v))}
    check_settings(given, "flags")
    for table, arch in (("student_args", "student"), ("arch_args", "teacher_arch")):  # merged key by key, as -p is
        if isinstance(data.get(table), dict) and table in given and given.get(arch) in (None, data.get(arch)):
            given[table] = {**data[table], **given[table]}
    _check_file_paths({k: v for k, v in data.items() if k not in given}, source)
    if (typed := given.get("method")) and data.get("method", typed) != typed:  # the file's params are another's
        source = f"{source} (its params are for its method {data['method']!r}; this run's is {typed})"
    data.update(given)
    data["params"] = {**file_params, **cli_params}
    cfg = replace(DistillConfig.from_dict(data, source if config_file else "flags"),
                  from_file=tuple(sorted(set(file_params) - set(cli_params))))
    check_method_params(cfg.method, file_params, source)
    check_method_params(cfg.method, cli_params, "-p")
    from dfkd.objectives import objective_names, stray_weights

    objective_names(cfg.params)  # the names, from the file and -p together
    if why := stray_weights(cfg.params):  # typed with -p: refused; a file's (another run's config.json): warned
        if "feature_weight" in cli_params:
            raise DfkdError(f"-p {why}")
        warnings.warn(f"{source}: params.{why}; those weights are not used", stacklevel=2)
    if cfg.fid_ref and not cfg.fid_every:  # the file was not even opened, and no FID was logged, unsaid
        warnings.warn(f"--fid-ref {cfg.fid_ref} has no effect: --fid-every 0 turns FID monitoring off (the end of "
                      "the run's FID too)", stacklevel=2)
    return cfg


#: The settings that name a file or folder to read.
PATH_KEYS = ("teachers", "eval_data", "transfer_data", "data", "fid_ref")


def _check_file_paths(data: dict[str, Any], source: str) -> None:
    """A config file's path that does not exist, named as the file's key (it was named as a flag never typed)."""
    for key in PATH_KEYS:
        value = data.get(key)
        for path in (value if isinstance(value, (list, tuple)) else [value] if value else []):
            if isinstance(path, str) and not os.path.exists(path):
                where = "" if os.path.isabs(path) else f" (a relative path in the file is read from the folder " \
                    f"you run in, {os.getcwd()})"
                raise DfkdError(f"{source}: {key} = {path!r}: no such file or folder{where}; fix the path in the "
                                "file, or give the flag")


def check_method_params(method: str, params: dict[str, Any], source: str = "-p", min_s_steps: int = 1) -> None:
    """Refuse unknown keys and values of the wrong type or range for `method` (its recipe for no teacher)."""
    from dfkd.methods import get_method

    if not params:
        return
    if method == "auto":  # checked against the chosen method once the teacher is loaded (dfkd.auto.resolve)
        from dfkd.auto import check_auto_params

        return check_auto_params(params, source)
    recipe = get_method(method).default_params(None)
    resolve_params(recipe, params, method, source)
    check_params(params, recipe, method, source, min_s_steps)


def resolve_params(recipe: dict[str, Any], overrides: dict[str, Any], method: str,
                   source: str = "-p") -> dict[str, Any]:
    """The method's recipe with overrides applied; an unknown key is an error that lists the known ones.

    `source`: where the overrides come from, named in the error unless it is "-p".
    """
    unknown = sorted(set(overrides) - set(recipe))
    if unknown:
        where = "" if source == "-p" else f"{source}: "
        raise DfkdError(f"{where}method {method} has no parameter(s) {unknown}; its parameters: {sorted(recipe)}")
    return {**recipe, **overrides}
