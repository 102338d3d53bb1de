"""Checking every value that reaches a run, once, before any file is written.

Settings of `dfkd distill` (flags, config files) are checked against `FIELDS`; method hyper-parameters (`-p`,
`params` in a config file) against a schema derived from the method's recipe: each key takes the type of its
default (an integer stays an integer, a float takes any finite number, a list a list, a string a string) and
`RANGES`/`CHOICES` add bounds and allowed values. Every message names the key, the value and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dfkd.errors import DfkdError

#: Largest seed torch and NumPy accept alike.
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Rule:
    """What a value may be: its kind, bounds and choices.

    Kinds: "int", "number", "str", "bool", "list", "table" (a dict of names), "any", "size" (an image side or a
    [height, width] pair), "weights" (a number, or a table of names to numbers; the bounds hold for each) and
    "base" (a logarithm's: a number > 0 other than 1, or "e").

    `lo`/`hi` bound numbers (`lo_open`: strictly above `lo`, `hi_open`: strictly below `hi`); `choices` lists the
    allowed values; `none_ok` lets None through; `items` checks every element of a list, `length` its number of
    elements (an exact count, or (fewest, most)), `ascending` their order.
    """

    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    choices: tuple[Any, ...] | None = None
    none_ok: bool = False
    items: Rule | None = None
    length: int | tuple[int, int] | None = None
    ascending: bool = False
    hi_open: bool = False

    def allowed(self, none: bool = True, plural: bool = False) -> str:
        """What is allowed, in words (`none`: mention that null is allowed, where it is; `plural`: a list's items)."""
        if self.choices is not None:
            return "one of " + ", ".join("null (none)" if c is None else repr(c) for c in self.choices)
        kinds = _PLURAL if plural else _SINGULAR
        words = kinds[self.kind]
        if self.lo is not None:
            words += f" {'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            words += f"{' and' if self.lo is not None else ''} {'<' if self.hi_open else '<='} {self.hi:g}"
        if self.kind == "list":
            lo, hi = self._lengths()
            count = "" if self.length is None else f"{lo} " if lo == hi else f"{lo} to {hi} "
            words = f"a list of {count}{self.items.allowed(plural=True)}" if self.items is not None else \
                f"a list of {count}values" if count else words
        if self.kind == "weights":
            words += ", or a table of names to such numbers"
        if self.ascending:
            words += ", in ascending order"
        return words + (" (or null)" if self.none_ok and none else "")

    def problem(self, v: Any) -> bool:
        """True when `v` breaks the rule."""
        if self.choices is not None:
            return not any(v is c or (type(v) is type(c) and v == c) for c in self.choices)
        if v is None:
            return not self.none_ok
        check: Callable[[Any], bool] = _KIND_CHECKS[self.kind]
        if not check(v):
            return True
        if self.kind == "size":
            return self.lo is not None and any(a < self.lo for a in ([v] if _is_int(v) else v))
        if self.kind == "weights":
            return any(Rule("number", self.lo, self.hi, self.lo_open, hi_open=self.hi_open).problem(a)
                       for a in (v.values() if isinstance(v, dict) else [v]))
        if self.kind in ("int", "number"):
            return (self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo)) or \
                (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))
        if self.kind == "list":
            lo, hi = self._lengths()
            return not lo <= len(v) <= hi or (self.items is not None and any(self.items.problem(a) for a in v)) or \
                (self.ascending and any(a > b for a, b in zip(v, v[1:])))
        return False

    def _lengths(self) -> tuple[float, float]:
        if self.length is None:
            return 0, float("inf")
        return (self.length, self.length) if isinstance(self.length, int) else self.length


def _finite(v: Any) -> bool:
    """True for values holding no NaN or infinity anywhere (lists and dicts looked into)."""
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, (list, tuple)):
        return all(_finite(a) for a in v)
    if isinstance(v, dict):
        return all(_finite(a) for a in v.values())
    return True


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


#: The largest magnitude a method setting may have: learning rates and weights become float32 tensors (1e300 passed
#: as "finite" and failed at the first step with a traceback). Run settings (a budget in minutes) are not bound.
FLOAT32_MAX = 3.4028234663852886e38


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _too_large(v: Any) -> str:
    """What a message adds for a value holding a finite number past float32 (else "")."""
    items = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else [v]
    big = any(isinstance(a, (int, float)) and not isinstance(a, bool) and abs(a) > FLOAT32_MAX
              and (isinstance(a, int) or math.isfinite(a)) for a in items)  # an int is never inf (nor a float)
    return f" (a number's size may be at most {FLOAT32_MAX:.3g}: the networks compute in float32)" if big else ""


def _is_size(v: Any) -> bool:
    return _is_int(v) or (isinstance(v, (list, tuple)) and len(v) == 2 and all(map(_is_int, v)))


_SINGULAR = {"int": "an integer", "number": "a finite number", "str": "a non-empty string", "bool": "true or false",
             "list": "a list", "any": "a finite value", "size": "pixels, an integer or [height, width] (each)",
             "table": "a table of names to values (JSON: {\"depth\": 16}; TOML: a [table])",
             "weights": "a finite number", "base": "a logarithm base: a number > 0 other than 1, or \"e\""}
_PLURAL = {**_SINGULAR, "int": "integers", "number": "finite numbers", "str": "non-empty strings", "bool": "booleans",
           "list": "lists", "any": "finite values", "table": "tables"}

_KIND_CHECKS: dict[str, Callable[[Any], bool]] = {
    "int": _is_int, "number": _is_number,
    "size": _is_size, "str": lambda v: isinstance(v, str) and bool(v.strip()),
    "bool": lambda v: isinstance(v, bool), "list": lambda v: isinstance(v, (list, tuple)) and _finite(v),
    "any": _finite, "table": lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
    "base": lambda v: v == "e" or (_is_number(v) and v > 0 and v != 1),
    "weights": lambda v: _is_number(v) or (isinstance(v, dict) and all(isinstance(k, str) and _is_number(a)
                                                                       for k, a in v.items())),
}

_STR = Rule("str", none_ok=True)
_POS = Rule("int", lo=1)
#: DistillConfig fields (the keys of a config file; `--flag` names on the command line).
FIELDS: dict[str, Rule] = {
    "method": Rule("str"), "teachers": Rule("list", items=Rule("str")), "teacher_arch": _STR,
    "trust_pickle": Rule("bool"), "channels": Rule("int", lo=1, none_ok=True),
    "input_size": Rule("size", lo=8, none_ok=True),
    "mean": Rule("list", items=Rule("number"), none_ok=True),
    "std": Rule("list", items=Rule("number", lo=0, lo_open=True), none_ok=True),
    "student": _STR, "student_init": Rule("str", choices=("auto", "teacher", "random")),
    "steps": Rule("int", lo=1, none_ok=True),
    "budget_minutes": Rule("number", lo=0, lo_open=True, none_ok=True), "eval_data": _STR,
    "budget_clock": Rule("str", choices=("wall", "cpu")),
    "eval_every": _POS, "log_every": _POS, "image_every": _POS, "ckpt_every": _POS, "fid_ref": _STR,
    "fid_every": Rule("int", lo=0), "fid_samples": Rule("int", lo=2), "transfer_data": _STR, "data": _STR,
    "seed": Rule("int", lo=0, hi=MAX_SEED), "device": Rule("str"), "out": _STR, "runs_dir": Rule("str"),
    "quantize": Rule("str", choices=(None, "int8")), "params": Rule("any"),
    "precision": Rule("str", choices=("auto", "fp32", "bf16", "fp16")), "compile": Rule("bool"),
    "deterministic": Rule("bool"), "arch_args": Rule("table"), "student_args": Rule("table"),
}

_RATE = Rule("number", lo=0, lo_open=True)
#: A learning rate: > 0, and at most a million (far past any that trains: 1e38 passed and overflowed inside Adam, whose
#: first step multiplies it by 1 / (1 - beta1), with a traceback at the first step).
_LR = Rule("number", lo=0, lo_open=True, hi=1e6)
_FRACTION = Rule("number", lo=0, hi=1)
#: Bounds of method hyper-parameters beyond their type (keys absent from a method's recipe are ignored).
RANGES: dict[str, Rule] = {
    **{k: Rule("int", lo=1) for k in ("batch_size", "s_steps", "g_steps", "iterations", "di_iters", "di_batch",
                                       "pool_size", "bank_size", "n_neg", "nz", "proj_dim", "plateau_patience")},
    # None: follows batch_size / runs saved before recipes resolved the generator width
    "synth_batch_size": Rule("int", lo=1, none_ok=True), "ngf": Rule("int", lo=1, none_ok=True),
    "jitter": Rule("int", lo=0),
    **{k: _LR for k in ("lr_s", "lr_g", "lr_z", "lr_d", "lr_di", "lr_inv", "plateau_min_lr")},
    **{k: _RATE for k in ("T", "adi_T", "di_T", "cr_T", "gamma", "bn_eps")},
    "ie_log_base": Rule("base", none_ok=True),  # a number > 0 other than 1, or "e"
    "lr_meta": Rule("number", lo=0, lo_open=True, hi=1e6, none_ok=True),  # None: lr_g * g_steps (fast)
    "pool_dir": Rule("str", none_ok=True),
    **{k: _FRACTION for k in ("momentum", "bn_mmt", "flip_p", "warmup", "reset_at", "lowres")},
    **{k: Rule("number", lo=0, lo_open=True, none_ok=True) for k in ("grad_clip", "clip_s")},
    "synth_seconds": Rule("number", lo=0, lo_open=True, none_ok=True),
    "weight_decay": Rule("number", lo=0), "milestones": Rule("list", items=_FRACTION),
    # Adam's (beta1, beta2); ZSKD's Dirichlet concentration scales; CMI's local crop's area range
    **{k: Rule("list", items=Rule("number", lo=0, hi=1, hi_open=True), length=2) for k in ("betas_g", "betas_inv")},
    "betas": Rule("list", items=Rule("number", lo=0, lo_open=True), length=(1, 64)),
    "local_scale": Rule("list", items=Rule("number", lo=0, lo_open=True, hi=1), length=2, ascending=True),
    **{k: Rule("int", lo=0) for k in ("watch_every", "select_every")},
    **{k: Rule("int", lo=1) for k in ("heldout_size", "heldout_chunk", "collapse_patience")},
    **{k: Rule("number", lo=0) for k in ("select_margin", "ram_budget_mib")},
    "is_maml": Rule("int", choices=(0, 1)),
    **{k: Rule("number", lo=0) for k in ("adv", "bn", "oh", "cr", "ce", "kd", "a", "adi", "balance", "ie", "input",
                                         "mutual", "first_bn", "tv_l1", "tv_l2", "l2", "at_beta", "disc_weight",
                                         "reptile_alpha")},
    "teacher_weights": Rule("list", items=Rule("number", lo=0), none_ok=True),
    "feature_weight": Rule("weights", lo=0, none_ok=True),  # a negative one rewards unlike features
    # NAYER
    **{k: Rule("int", lo=1) for k in ("g_loops", "gwp_loops", "g_life", "le_emb_size", "le_size")},
    "warmup_rounds": Rule("int", lo=0), "class_names": Rule("list", items=Rule("str"), none_ok=True),
    "ta_threshold": _FRACTION, "ta_max_draws": Rule("int", lo=1),  # TA-DFKD (dfkd.methods._verify)
}
CHOICES: dict[str, tuple[Any, ...]] = {
    "s_optimizer": ("sgd", "adam"), "schedule": ("constant", "cosine", "multistep"),
    "teacher_weighting": ("mean", "confidence"), "discriminator": (None, "logits", "features"),
    "inv_schedule": ("cosine", "constant", "plateau"), "recipe": ("paper", "cpu"),
    "kd_augment": ("none", "crop_flip"), "kl_reduction": ("batchmean", "mean"),
    "pool_dtype": ("float16", "bfloat16", "float32"), "bn_form": ("di", "gaussian_kl"),
    "head": ("tanh_bn", "bn", "sigmoid"), "init": ("randn", "zeroq"),
}
#: The augmentations of the student's views (`dfkd.augment.make_augment`): the choices of a string `augment`
#: (kd's `augment` is true or false).
AUGMENT_KINDS = ("none", "jitter_flip", "crop_flip", "resized_crop")


def flag_name(key: str) -> str:
    """The command-line flag of a DistillConfig field (`teachers` -> `--teacher`)."""
    return "--teacher" if key == "teachers" else "--" + key.replace("_", "-")


def _show(v: Any) -> str:
    """A flag's value as it was typed (a repeated flag's values space-separated)."""
    return " ".join(str(a) for a in v) if isinstance(v, (list, tuple)) else str(v)


def check_settings(data: dict[str, Any], source: str) -> None:
    """Check DistillConfig fields from `source` ("flags" or a config file's path).

    Raises:
        DfkdError: naming the key (or flag), the value and what is allowed.
    """
    for key, value in data.items():
        rule = FIELDS.get(key)
        if rule is None:
            continue  # unknown keys are refused by DistillConfig.from_dict, with the list of known ones
        v = list(value) if isinstance(value, tuple) else value
        if key in ("teachers", "mean", "std") and not isinstance(v, (list, type(None))):
            v = [v]
        if rule.problem(v):
            where = f"{flag_name(key)} {_show(value)}" if source == "flags" else f"{source}: {key} = {value!r}"
            raise DfkdError(f"{where}: must be {rule.allowed(none=source != 'flags')}")


def param_rule(key: str, default: Any) -> Rule:
    """The rule for method parameter `key`, whose recipe default is `default`."""
    if key in CHOICES:
        return Rule("str", choices=CHOICES[key])
    if key == "augment" and isinstance(default, str):
        return Rule("str", choices=AUGMENT_KINDS)
    if key in RANGES:
        return RANGES[key]
    if isinstance(default, bool):
        return Rule("bool")
    if isinstance(default, int):
        return Rule("int")
    if isinstance(default, float):
        return Rule("number")
    if isinstance(default, str):
        return Rule("str")
    if isinstance(default, list):
        return Rule("list")
    return Rule("any", none_ok=True)


def check_params(params: dict[str, Any], recipe: dict[str, Any], method: str, source: str = "-p",
                 min_s_steps: int = 1) -> None:
    """Check method hyper-parameter overrides against the types and bounds of `method`'s recipe.

    Args:
        params: the overrides.
        recipe: the method's defaults (`Method.default_params()`); unknown keys are refused elsewhere.
        method: the method's name, for messages.
        source: "-p" or the config file's path.
        min_s_steps: the fewest student steps a round may take (`dfkd synthesize` allows 0).

    Raises:
        DfkdError: naming the key, the value and what is allowed.
    """
    for key, value in params.items():
        if key not in recipe:
            continue
        rule = param_rule(key, recipe[key])
        if key == "s_steps":
            rule = Rule("int", lo=min_s_steps)
        too_large = _too_large(value)
        if rule.problem(value) or too_large:
            where = f"-p {key}={value}" if source == "-p" else f"{source}: params.{key} = {value!r}"
            raise DfkdError(f"{where}: method {method} needs {rule.allowed()}{too_large}")
