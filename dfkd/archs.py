"""Architectures by name: the zoo, torchvision, timm, and a user's own `module:callable` (DESIGN §4).

Names:

- ``resnet18`` (no colon): a zoo model (`dfkd models`), built with the file's classes, channels and size.
- ``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None, **kwargs)``.
- ``timm:NAME``: ``timm.create_model(NAME, pretrained=False, **kwargs)`` (the optional extra
  ``pip install -e ".[timm]"``).
- ``module:callable``: a class or factory function of the user's code, called with the keyword arguments
  (``--arch-arg KEY=VALUE``); ``pkg.mod:Outer.build`` reaches nested attributes.

Library models never download weights: the weights always come from the user's file. ``num_classes`` is read from
the state_dict's classifier (the last 2-D weight) when the user does not give it.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import os
import site
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfkd.errors import DfkdError
from dfkd.spec import InputSpec, split_size

LIBRARIES = ("torchvision", "timm")
TIMM_INSTALL = 'pip install -e ".[timm]" (or pip install timm)'
#: Keyword arguments that would make a library fetch weights: dfkd's weights always come from the user's file.
DOWNLOAD_ARGS = ("weights", "weights_backbone", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay")


def arch_kind(arch: str) -> str:
    """"zoo", "torchvision", "timm" or "module" for an architecture name."""
    prefix, sep, _ = arch.partition(":")
    if not sep:
        return "zoo"
    return prefix if prefix in LIBRARIES else "module"


def canonical_arch(arch: str) -> str:
    """`torchvision.models:NAME` (a factory function of torchvision) is `torchvision:NAME`, which model files accept."""
    mod, sep, name = arch.partition(":")
    return f"torchvision:{name}" if sep and mod == "torchvision.models" and name.isidentifier() else arch


def parse_arch_args(texts: tuple[str, ...] | list[str], flag: str = "--arch-arg") -> dict[str, Any]:
    """`KEY=VALUE` texts as a dict; a value is read as JSON when it parses (numbers, true/false, lists), else text."""
    out: dict[str, Any] = {}
    for text in texts:
        key, sep, raw = text.partition("=")
        if not sep or not key.strip().isidentifier():
            raise DfkdError(f"{flag} {text!r}: expected KEY=VALUE with KEY a Python name, e.g. {flag} num_classes=10")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def class_candidates(state: dict[str, torch.Tensor]) -> list[int]:
    """The output sizes of the state_dict's 2-D weights, the last one's first: what its classifier may give.

    `torch.save` keeps a state_dict in the model's order, so the classifier is its last 2-D weight; a safetensors
    file sorts the names (`classifier.weight` before `fc.0.weight`), so the others are tried in turn. After them
    the 1x1 convolutions', last first: SqueezeNet's classifier is one.
    """
    weights = [v for k, v in state.items() if k.rsplit(".", 1)[-1] == "weight"]
    linear = [w for w in weights if w.dim() == 2]
    pointwise = [w for w in weights if w.dim() == 4 and tuple(w.shape[2:]) == (1, 1)]
    return list(dict.fromkeys(int(w.shape[0]) for w in [*reversed(linear), *reversed(pointwise)]))


def _fits(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """True when `state` has the model's names and shapes (what a strict load needs).

    BatchNorm's step counters are left aside: some exporters drop them, and a load fills them in.
    """
    own = model.state_dict()
    return _names(own) == _names(state) and all(own[k].shape == v.shape for k, v in state.items() if k in own)


def _names(keys: Any) -> set[str]:
    """State_dict names without BatchNorm's `num_batches_tracked` counters."""
    return {k for k in keys if not k.endswith("num_batches_tracked")}


def build_model(arch: str, kwargs: dict[str, Any], flag: str = "--teacher-arch", trusted: bool = True) -> nn.Module:
    """Build architecture `arch` with constructor arguments `kwargs`, with fresh (never downloaded) weights.

    Args:
        arch: a zoo name, `torchvision:NAME`, `timm:NAME` or `module:callable`.
        kwargs: constructor arguments (zoo: num_classes, in_channels, input_size and extras).
        flag: the option the name came from, for messages.
        trusted: False when the name comes from a file rather than the command line: then `module:callable` must
            be an nn.Module class or a function of the user's own code (not the standard library or an installed
            package), so a model file cannot make dfkd call an arbitrary function.

    Returns:
        The model, in train mode.
    """
    kind = arch_kind(arch)
    args = "--student-arg" if flag == "--student" else "--arch-arg"
    fix = f"check the name and {args} KEY=VALUE" if trusted else \
        "the file's arch_kwargs do not fit it: re-export the file"
    if kind == "zoo":
        from dfkd.models import MODELS, create

        if arch not in MODELS:
            raise DfkdError(f"{flag} {arch}: unknown zoo architecture; known: {', '.join(MODELS.names())}; or use "
                            "torchvision:NAME, timm:NAME or module:callable")
        return _call(arch, lambda **kw: create(arch, **kw), kwargs, flag, fix)
    _refuse_downloads(arch, kwargs, flag)
    name = arch.partition(":")[2]
    if kind == "torchvision":
        model = _call(arch, _torchvision_factory(name, flag), {"weights": None, **_aux_kwargs(name, kwargs, flag)},
                      flag, fix)
    elif kind == "timm":
        model = _call(arch, _timm_factory(name, flag), {"pretrained": False, **kwargs}, flag, fix)
    else:
        model = _call(arch, import_callable(arch, flag, trusted), kwargs, flag, fix)
    _declare_stages(model)
    return model


#: torchvision models with auxiliary classifiers, whose ImageNet weights also turn `transform_input` on.
AUX_MODELS = ("googlenet", "inception_v3")


def _aux_kwargs(name: str, kwargs: dict[str, Any], flag: str) -> dict[str, Any]:
    """GoogLeNet and Inception-v3: no auxiliary heads for a student, and what a teacher's file cannot say.

    In training mode those heads make the forward return a named tuple (a student crashed on it); their weight
    initialisation is fixed (`init_weights=True`, what torchvision does now, without its FutureWarning). Built from
    ImageNet weights they re-normalise their input inside the model (`transform_input=True`), which a state_dict
    does not record: a teacher fine-tuned from them is warned to say so.
    """
    if name not in AUX_MODELS:
        return kwargs
    kwargs = {"init_weights": True, **kwargs}
    if flag == "--student":
        return {"aux_logits": False, **kwargs}
    if "transform_input" not in kwargs:
        warnings.warn(f"{flag} torchvision:{name}: built with transform_input=False, as torchvision does without "
                      "weights; one fine-tuned from torchvision's ImageNet weights re-normalises its input inside "
                      "(transform_input=True), which its state_dict does not record: if yours was, add --arch-arg "
                      "transform_input=true", stacklevel=3)
    return kwargs


def _refuse_downloads(arch: str, kwargs: dict[str, Any], flag: str) -> None:
    bad = [k for k in kwargs if k in DOWNLOAD_ARGS]
    if bad:
        raise DfkdError(f"{flag} {arch}: dfkd does not take {bad[0]!r}: weights come from your file, never from a "
                        "download; drop that --arch-arg")


def _call(arch: str, factory: Any, kwargs: dict[str, Any], flag: str, fix: str) -> nn.Module:
    try:
        model = factory(**kwargs)
    except DfkdError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure here is the name or its arguments
        shown = {k: v for k, v in kwargs.items() if k not in ("weights", "pretrained")}
        raise DfkdError(f"{flag} {arch}: could not build it with arguments {shown} ({_short(e)}); {fix}") from None
    if not isinstance(model, nn.Module):
        raise DfkdError(f"{flag} {arch}: returned a {type(model).__name__}, not an nn.Module")
    return model


def _torchvision_factory(name: str, flag: str) -> Any:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)  # the classification models
    if name not in known:
        raise DfkdError(f"{flag} torchvision:{name}: not a torchvision classification model{_close(name, known)}; "
                        "see torchvision.models.list_models()")
    return lambda **kw: torchvision.models.get_model(name, **kw)


def _timm_factory(name: str, flag: str) -> Any:
    timm = _import_timm(f"{flag} timm:{name}")
    if not timm.is_model(name):
        raise DfkdError(f"{flag} timm:{name}: not a timm model{_close(name, timm.list_models())}; see "
                        "timm.list_models()")
    return lambda **kw: timm.create_model(name, **kw)


def _import_timm(what: str) -> Any:
    try:
        import timm
    except ImportError:
        raise DfkdError(f"{what}: timm is not installed; install it with {TIMM_INSTALL}") from None
    return timm


def _close(name: str, known: list[str]) -> str:
    near = difflib.get_close_matches(name, known, n=3)
    return f" (did you mean {', '.join(near)}?)" if near else ""


def _short(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:200]


def _declare_stages(model: nn.Module) -> None:
    """ResNet-like library models (torchvision's and timm's) declare layer1-4 as stages, for attention transfer."""
    names = ("layer1", "layer2", "layer3", "layer4")
    if not getattr(model, "stages", None) and all(isinstance(getattr(model, n, None), nn.Module) for n in names):
        model.stages = names


def importable_from_cwd() -> None:
    """Let the user's own modules in the current directory import, as `python -m` would (the `dfkd` script does not)."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def import_callable(target: str, flag: str = "--teacher-arch", trusted: bool = True) -> Any:
    """Import `module:callable` (a class or factory function) from the current directory or PYTHONPATH."""
    mod_name, _, attr = target.partition(":")
    if not mod_name or not attr:
        raise DfkdError(f"{flag} {target!r}: expected a zoo name, torchvision:NAME, timm:NAME or module:callable")
    importable_from_cwd()
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module
        raise DfkdError(f"{flag} {target}: cannot import module {mod_name!r} ({_short(e)}); run from the folder "
                        "that holds it or add that folder to PYTHONPATH") from None
    obj: Any = mod
    for part in attr.split("."):
        obj = getattr(obj, part, None)
    is_class = isinstance(obj, type) and issubclass(obj, nn.Module)
    if not is_class and not (callable(obj) and not isinstance(obj, type)):
        raise DfkdError(f"{flag} {target}: module {mod_name!r} has no nn.Module class or factory function {attr!r}")
    if not trusted and not is_class and not own_function(obj):
        where = getattr(obj, "__module__", None) or mod_name
        raise DfkdError(f"{flag} {target}: a file may name an nn.Module class or a factory function of your own "
                        f"code, not a function of {where!r} (dfkd, the standard library or an installed package); if "
                        "you trust it, give it on the command line (--teacher-arch, --student)")
    return obj


def own_function(obj: Any) -> bool:
    """True for a plain Python function defined in the user's own code (what a file may name as a factory).

    The function's own module is what counts, not the one the name starts from: `dfkd.io:os.system` reaches the
    standard library through an attribute of a module. dfkd's functions are not the user's, wherever it is installed
    (an editable install is outside site-packages).
    """
    if not inspect.isfunction(obj):  # a builtin, a partial, a callable object: not a factory of the user's
        return False
    name = getattr(obj, "__module__", None) or ""
    if name == "dfkd" or name.startswith("dfkd."):
        return False
    return user_code(sys.modules.get(name))


def user_code(mod: Any) -> bool:
    """True for a module outside the standard library and installed packages (the user's own code)."""
    path = getattr(mod, "__file__", None)
    if not path:
        return False
    roots = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots |= {*site.getsitepackages(), site.getusersitepackages()}  # the user's site and a distribution's packages
    p = Path(path).resolve()
    return not any(p.is_relative_to(Path(r).resolve()) for r in roots)


def accepts(arch: str, key: str, flag: str = "--teacher-arch", trusted: bool = True) -> bool:
    """Whether `arch`'s constructor takes keyword `key` (library factories all take num_classes)."""
    if arch_kind(arch) != "module":
        return True
    try:
        params = inspect.signature(import_callable(arch, flag, trusted)).parameters
    except (TypeError, ValueError):
        return True
    return key in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def library_spec(arch: str | None, arch_args: dict[str, Any] | None = None) -> InputSpec | None:
    """The input spec a library records for a model (timm's pretrained config), or None.

    torchvision models built without weights know nothing of their input; neither do the zoo or user code.
    """
    if not arch or arch_kind(arch) != "timm":
        return None
    name = arch.partition(":")[2]
    timm = _import_timm(f"--teacher-arch {arch}")
    pretrained = timm.get_pretrained_cfg(name) if timm.is_model(name) else None
    if pretrained is None:
        return None
    cfg = timm.data.resolve_data_config({}, pretrained_cfg=pretrained.to_dict())
    channels = int((arch_args or {}).get("in_chans", cfg["input_size"][0]))
    height, width = int(cfg["input_size"][-2]), int(cfg["input_size"][-1])
    if len(cfg["mean"]) != channels:
        return None
    return InputSpec(channels, height, tuple(cfg["mean"]), tuple(cfg["std"]), width)


def flag_spec(channels: int | None, size: int | tuple[int, int] | list[int] | None, mean: tuple[float, ...] | None,
              std: tuple[float, ...] | None, arch: str | None = None,
              arch_args: dict[str, Any] | None = None) -> InputSpec | None:
    """The input spec the flags give, completed from the library's config (timm) where it has one.

    Never a silent mean 0 / std 1: without --mean/--std and without a library config that has them, this is an
    error that says how to give them. None when no spec flag is given (the file's or the library's spec is used).
    `size` is a side, or (height, width) for non-square inputs.
    """
    if channels is None and size is None and not mean and not std:
        return None
    lib = library_spec(arch, arch_args) if arch_kind(arch or "") == "timm" else None
    took = [f for f, v in (("--channels", channels), ("--input-size", size)) if v is None] if lib else []
    channels = channels if channels is not None else lib and lib.channels
    size = size if size is not None else lib and lib.hw
    if took:  # --mean/--std alone took the shape from timm's config unsaid: a model fine-tuned at 96 px ran at 224
        warnings.warn(f"--teacher-arch {arch}: {'/'.join(took)} not given; using timm's pretrained config "
                      f"({lib.describe()}); pass {' and '.join(took)} if your weights were trained otherwise",
                      stacklevel=1)
    if channels is None or size is None:
        given = [f for f, v in (("--channels", channels), ("--input-size", size), ("--mean", mean), ("--std", std))
                 if v]
        missing = " and ".join(f for f, v in (("--channels", channels), ("--input-size", size)) if v is None)
        raise DfkdError(f"{'/'.join(given)} without {missing}: the input flags go together (--channels, --input-size, "
                        f"--mean, --std make one input spec, which replaces the one a file carries); add {missing}, "
                        "or give none of them to use the file's")
    if not mean or not std:
        if lib is None or lib.channels != channels:
            raise DfkdError(f"--channels {channels} --input-size {_size_text(size)} without --mean/--std: give the "
                            "normalisation the teacher was trained with, one value per channel (repeat the flag, e.g. "
                            "--mean 0.4914 --mean 0.4822 --mean 0.4465 --std 0.247 --std 0.243 --std 0.261 for "
                            "CIFAR-10); for unnormalised pixels in [0, 1] pass --mean 0 --std 1")
        warnings.warn(f"--teacher-arch {arch}: --mean/--std not given; using timm's pretrained config (mean "
                      f"{lib.mean}, std {lib.std}); pass --mean/--std if your weights were trained otherwise",
                      stacklevel=1)
        mean, std = mean or lib.mean, std or lib.std
    try:
        height, width = split_size(size)
        return InputSpec(channels, height, tuple(mean), tuple(std), width)
    except DfkdError as e:
        raise DfkdError(f"--channels {channels} --input-size {_size_text(size)}: {e}") from None


def _size_text(size: int | tuple[int, int] | list[int]) -> str:
    """An input size as its flag spells it: 32, or 28x56."""
    return str(size) if isinstance(size, int) else "x".join(str(a) for a in size)


def model_from_state(state: dict[str, torch.Tensor], arch: str, arch_args: dict[str, Any] | None,
                     spec: InputSpec | None, what: str) -> tuple[nn.Module, dict[str, Any], InputSpec | None]:
    """Build `arch` for a state_dict and load it: the model, the constructor arguments used, and the input spec.

    Zoo models need the spec (their constructors take channels and size); library and user models take
    `num_classes` from the classifier when the arguments do not give it (user code only if its signature has it).
    A timm model without spec flags gets timm's pretrained config, with a warning line saying so.

    Args:
        state: the weights.
        arch: the architecture name (see the module docstring).
        arch_args: constructor arguments from `--arch-arg`.
        spec: the input spec from flags, or None.
        what: the file, for messages ("--teacher private.pt").
    """
    arch = canonical_arch(arch)
    kwargs = dict(arch_args or {})
    if arch_kind(arch) == "zoo":
        if spec is None:
            raise DfkdError(f"{what}: a state_dict carries no input spec; add --channels C --input-size S "
                            "(and --mean/--std)")
        kwargs = {"in_channels": spec.channels, "input_size": spec.side, **kwargs}
    if arch_kind(arch) == "timm":
        spec = spec or _timm_default_spec(arch, kwargs)
        if spec is not None and spec.channels != 3:
            kwargs.setdefault("in_chans", spec.channels)
    model, built = _build_for(arch, kwargs, state)
    inner = _under_prefix(state, model.state_dict().keys(), what)
    if inner is not state:  # the model's weights sit under a prefix (a Lightning checkpoint's `model.`)
        state = inner
        model, built = _build_for(arch, kwargs, state)
    load_state_checked(model, state, f"{what} with --teacher-arch {arch}")
    return model, built, spec


def _build_for(arch: str, kwargs: dict[str, Any], state: dict[str, torch.Tensor]) -> tuple[nn.Module, dict[str, Any]]:
    """`arch` built for `state`: with its `num_classes` when given, else the first 2-D weight size that fits."""
    candidates = class_candidates(state)
    if "num_classes" in kwargs or not accepts(arch, "num_classes"):
        return build_model(arch, kwargs), kwargs
    if not candidates:
        kwargs = {**kwargs, "num_classes": 10} if arch_kind(arch) == "zoo" else kwargs
        return build_model(arch, kwargs), kwargs
    first = None
    for classes in candidates:  # names not in the model's order (safetensors): another 2-D weight's size
        built = {**kwargs, "num_classes": classes}
        model = build_model(arch, built)
        if _fits(model, state):
            return model, built
        first = first or (model, built)
    return first


def unwrapped(name: str) -> str:
    """A weight's name without the prefixes of PyTorch's wrappers (DataParallel/DDP, torch.compile), however nested.

    DataParallel and DistributedDataParallel add `module.`, `torch.compile` adds `_orig_mod.`.
    """
    while name.startswith(("module.", "_orig_mod.")):
        name = name.split(".", 1)[1]
    return name


def _under_prefix(state: dict[str, torch.Tensor], names: Any, what: str) -> dict[str, torch.Tensor]:
    """The weights whose names are the model's `names` after one leading `prefix.`, or `state` as it is.

    A training framework saves its module's weights under the attribute that holds the network (PyTorch
    Lightning's `model.conv1.weight`), beside other modules' (a loss's, an EMA copy's). Exactly one prefix must
    hold exactly the model's names; entries left out are said in a warning line.
    """
    names = _names(names)
    if names <= state.keys():
        return state
    found = []
    for prefix in dict.fromkeys(k.split(".", 1)[0] + "." for k in state if "." in k):
        inner = {unwrapped(k[len(prefix):]): v for k, v in state.items() if k.startswith(prefix)}
        if _names(inner) == names:
            found.append((prefix, inner))
    if len(found) > 1:
        raise DfkdError(f"{what}: holds weights of this architecture under {len(found)} prefixes "
                        f"({', '.join(repr(p) for p, _ in found)}); save the network you mean as a state_dict of its "
                        "own")
    if not found:
        return state
    prefix, inner = found[0]
    if len(inner) < len(state):
        warnings.warn(f"{what}: read the network's weights under {prefix!r}; {len(state) - len(inner)} other "
                      "entries of the file left out", stacklevel=1)
    return inner


def _timm_default_spec(arch: str, kwargs: dict[str, Any]) -> InputSpec | None:
    spec = library_spec(arch, kwargs)
    if spec is not None:
        warnings.warn(f"--teacher-arch {arch}: no --channels/--input-size/--mean/--std; using timm's pretrained config "
                      f"({spec.describe()}, mean {spec.mean}, std {spec.std}); give the flags if "
                      "your weights were trained otherwise", stacklevel=1)
    return spec


def load_state_checked(model: nn.Module, state: dict[str, Any], what: str) -> None:
    """`model.load_state_dict(state)` with a one-line error naming the first mismatches."""
    from dfkd.modelfile import load_state_checked as check

    check(model, state, what)
