"""`--method auto`: pick a registered method (and recipe) from measured properties of the teacher.

The rule is the table `RULES`: the first row whose condition holds on the teacher's `Profile` names the method,
the recipe when it must differ from the method's own rule (`dfkd.methods._recipes`), any other settings it
measured better for such teachers (a `-p` the user gives wins over them), and the benchmark rows the choice comes
from. The cross-teacher benchmark updates the table; nothing else in the package encodes the rule.

The profile is cheap and deterministic (it depends on the teacher alone, not on the run's seed or RNG): the input
spec (channels, size), the parameter count, the multiply-adds of one forward pass, whether the teacher has BatchNorm
layers with running statistics, whether it has attention layers (a vision transformer), and the teacher's answers
on `PROBE_BATCHES` x `PROBE_BATCH` standard-normal inputs (in its normalised input space, where a generator's
BN-normalised output lies): the logit scale (mean per-input standard deviation of the logits across classes), how
many classes those answers spread over (exp-entropy of the arg-max histogram) and the mean top-1 probability
(recorded, for the benchmark to test rules against; no row conditions on these three today). The run prints one
line saying what auto chose and why, and records it in config.json and the checkpoint (`DistillConfig.auto_choice`,
with `method` set to the chosen one), so a resumed run continues with it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from dfkd.cost import millions, multiply_adds
from dfkd.errors import DfkdError
from dfkd.methods._recipes import CPU_TEACHER_MACS, cpu_sized, input_kind
from dfkd.teacher import teacher_size

#: The name `--method` takes for the automatic choice (not a registered method: it resolves to one).
AUTO = "auto"
PROBE_BATCHES, PROBE_BATCH, PROBE_SEED = 4, 64, 0


@dataclass(frozen=True)
class Profile:
    """What auto measures on a teacher.

    Attributes:
        channels: input channels.
        size: input height in pixels (the side of a square input).
        kind: "mnist", "cifar" or "imagenet" (`dfkd.methods._recipes.input_kind`).
        params: parameter count.
        macs: multiply-adds of one forward pass on one input (None where torch's FLOP counter cannot see in).
        bn: whether it has BatchNorm layers with running statistics (the BN-matching methods need them).
        attention: whether it has attention layers (`has_attention`).
        classes: number of classes.
        logit_scale: mean over random inputs of the logits' standard deviation across classes.
        noise_classes: effective number of classes its arg-max spreads over on random inputs (1 to `classes`).
        noise_confidence: mean top-1 probability on random inputs.
        width: input width in pixels where it differs from `size` (None: square).
    """

    channels: int
    size: int
    kind: str
    params: int
    macs: int | None
    bn: bool
    attention: bool
    classes: int
    logit_scale: float
    noise_classes: float
    noise_confidence: float
    width: int | None = None

    def words(self) -> str:
        """The profile in one line, for the start-up message."""
        return (f"{self.channels}x{self.size}x{self.width or self.size} inputs ({self.kind} kind), "
                f"{self.params:,} parameters, "
                f"{millions(self.macs)} multiply-adds an input, "
                f"{'BatchNorm' if self.bn else 'no BatchNorm'}{', attention layers' if self.attention else ''}; "
                f"on {PROBE_BATCHES * PROBE_BATCH} random inputs: "
                f"logit scale {self.logit_scale:.3g}, answers spread over {self.noise_classes:.1f} of "
                f"{self.classes} classes, mean confidence {self.noise_confidence:.2f}")


@dataclass(frozen=True)
class Rule:
    """One row of the table: when `test` holds, run `method` (with `recipe`, None: the method's own rule).

    `params`: settings of the method the row sets besides the recipe (a `-p` the user gives for one wins).
    """

    when: str
    test: Callable[[Profile], bool]
    method: str
    recipe: str | None
    evidence: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def settings(self) -> dict[str, Any]:
        """What the row sets: the recipe (when it names one) and its other settings."""
        return {**({"recipe": self.recipe} if self.recipe else {}), **self.params}


#: First match wins; the last row always matches. Evidence: README *Results* tables (% of the teacher's top-1) and,
#: for what was tried session by session on the cross-teacher benchmark, docs/cross-teacher-history.md.
RULES: tuple[Rule, ...] = (
    Rule("BatchNorm, MNIST-kind inputs (at most 1x32x32 values, or grey and at most 32 px on the shorter side), "
         f"at most {millions(CPU_TEACHER_MACS)} multiply-adds an input",
         lambda p: p.bn and cpu_sized(p.kind, p.macs), "fast", None,
         "README 'Every method, 10 CPU-minutes', lenet5_bn (99.53): fast 99.3 % of the teacher, cmi 97.7, dfq 97.4, "
         "deepinversion 96.6, the GAN methods 28-75 %; README 'Cross-teacher benchmark', 5 CPU-minutes, every "
         "method: lenet5_bn fast 99.1 %, nayer 98.3, cmi 96.7, dfq 96.7, deepinversion 93.7, adi 93.4, the "
         "BN-free methods 47-85; custom Fashion-MNIST CNN with BN (90.49; its default student, the three-quarter "
         "LeNet-5) fast 92.9 %, nayer 91.4, cmi 90.9, deepinversion 84.5, dfq 83.7, adi 82.4, the rest 44-55; "
         "README 'Inputs that are not square', BN LeNet-5s, 5 CPU-minutes: MNIST at 1x28x44 (99.42) fast 99.3 %, dfq "
         "91.7; Fashion-MNIST at 1x28x56 (90.93) fast 94.4 %, dfq 84.6"),
    Rule(f"BatchNorm, any other (3-channel or larger inputs, or over {millions(CPU_TEACHER_MACS)} multiply-adds an "
         "input)", lambda p: p.bn, "dfq", "cpu",
         "README 'CIFAR-10, 10 CPU-minutes', wrn_16_1 (81.03; 26M multiply-adds), CPU recipes: dfq 58.4 % of the "
         "teacher, fast 33.0, cmi 30.3, dafl 23.0; dfad, online, zskt at chance; README 'Cross-teacher benchmark', "
         "a WRN-16-2 trained on Fashion-MNIST (90.23; 1x32x32, 101M multiply-adds), 10 CPU-minutes: dfq with its "
         "CPU recipe 91.5 / 88.6 % of the teacher (seeds 0 / 1), fast with the paper's recipe (auto's pick by the "
         "row above before this one) 81.9 / 80.1, fast with its CPU recipe 83.9, cmi with its CPU recipe 80.0; in "
         "bf16 (`--precision auto` on a CPU with AMX, twenty-fourth session) dfq's CPU recipe 94.97 / 94.39 % at "
         "10 CPU-minutes (seeds 0 / 1; 92.1 in fp32 on the same code) and 93.6 at 5, fast's 89.2 / 85.4 at 5"),
    Rule("no BatchNorm, attention layers (a vision transformer), MNIST-kind inputs",
         lambda p: not p.bn and p.attention and p.kind == "mnist", "fast", "cpu",
         "README 'Cross-teacher benchmark', a timm ViT trained on Fashion-MNIST (87.76; patch 4, width 64, depth 4), "
         "10 CPU-minutes: fast's CPU recipe 79.7 / 79.4 % of the teacher (seeds 0 / 1), with oh 2 and g_steps 10 "
         "81.9 / 80.7 (81.1 / 82.3 by this row); at 5 CPU-minutes fast 72.4, with oh 2 76.5, with g_steps 10 "
         "75.7, with both 81.1 (g_steps 20 79.4, 40 76.2; oh 4 72.8); a second ViT, on MNIST "
         "(98.81; patch 7, width 96, depth 3), 10 CPU-minutes: 94.8 (seed 0) against 97.2 / 96.9 with both. The ViT is "
         "about 50 % confident on fast's batches; a heavier class term (oh; paper 0.4) and twice the generator "
         "steps a batch aim at batches it is surer of. Not for the CNNs and the MLP: with both, fast at 5 "
         "CPU-minutes (teachers retrained in the twenty-ninth session) went from 85.0 / 88.6 to 88.3 / 89.0 "
         "(seeds 0 / 1) on the Fashion LeNet-5, 92.9 to 93.1 on the Fashion BN CNN, 92.9 to 92.5 on the Fashion "
         "Caffe LeNet, 95.4 to 95.1 on the BN-free Fashion CNN, 95.6 to 95.1 on the MLP, 98.8 to 99.0 on the MNIST "
         "LeNet-5, 91.2 to 90.9 on the VGG: level, within a seed's spread",
         params={"oh": 2.0, "g_steps": 10}),
    Rule("no BatchNorm, MNIST-kind inputs", lambda p: not p.bn and p.kind == "mnist", "fast", "cpu",
         "README 'Cross-teacher benchmark', 5 CPU-minutes, with the input-statistics term (a BN-free teacher's "
         "input matched to its normalisation): MNIST LeNet-5 (99.21) fast 99.1 % of the teacher, dfad 98.7, zskt "
         "98.5; Caffe MNIST LeNet (99.38) fast 99.5, dfad 99.3, online 99.2; Fashion-MNIST LeNet-5 (90.13) fast "
         "89.5, nayer 86.6, cmi 85.7, the BN-free methods 53.0-59.3 (dafl 59.3, dfad 58.7); Fashion-MNIST Caffe "
         "LeNet (89.29) fast 93.9, nayer 91.6, cmi 88.6, zskd 85.6, dafl 72.1, dfad 69.6; BN-free Fashion-MNIST "
         "CNN (89.92) fast 95.2, nayer 94.3, cmi 90.4, zskd 62.2, dfad 59.6. At 10 CPU-minutes (seeds 0 / 1) on "
         "the two MNIST teachers fast reaches 99.2 / 99.3 and 99.6 / 99.6 % against dfad's 99.0 / 97.4 and "
         "99.6 / 99.0 (dfad held them before, by a threshold on the teacher's confidence on noise). The CPU "
         "recipe, which every one of these (at most 2.3M multiply-adds) gets by its own rule, also for heavier "
         "ones: on a BN-free VGG-style Fashion-MNIST net (90.04; 22M multiply-adds, made after this row) nayer "
         "89.0, fast 87.9 (79.6 with the paper's recipe), cmi 85.3, zskd 62.5, and this row's fast 90.6 / 89.7 % "
         "at 10 CPU-minutes (seeds 0 / 1); in bf16 (`--precision auto` on a CPU with AMX) fast 90.1, nayer 89.6, "
         "cmi 88.4, dfq 85.9, and this row's fast 91.4 / 91.1 % at 10; fast's CPU recipe also led its paper "
         "recipe on a BN-free CIFAR-10 LeNet-5 (42.33 against 30.92 % top-1) and a Fashion-MNIST WRN-16-2 with "
         "BN (83.9 against 81.9 %)"),
    Rule("no BatchNorm, CIFAR-kind inputs (more than 1x32x32 values, not grey at up to 32 px a side; under 64 px)",
         lambda p: not p.bn and p.kind == "cifar", "fast", "cpu",
         "README 'Cross-teacher benchmark', a BN-free LeNet-5 trained on CIFAR-10 (59.56 %; 0.58 on noise), 5 "
         "CPU-minutes: fast with its CPU recipe 42.33 % top-1 (71.1 % of the teacher), fast with the paper's 30.92, "
         "dfad with its CPU recipe 22.36 (a collapse warning), dfad with the paper's 10.00 (at chance; a collapse "
         "warning), which this row replaced; at 10 CPU-minutes this row reaches 44.23 / 40.37 % (seeds 0 / 1). One "
         "teacher: a check rather than a proof"),
    Rule("no BatchNorm, 64 px or more (not measured)", lambda p: True, "fast", None,
         "no BN-free teacher of this size in the benchmark: fast (here with its ImageNet setting) led dfad on every "
         "BN-free teacher it has (the rows above: MNIST, Fashion-MNIST, CIFAR-10), and dfad ended at chance on "
         "the CIFAR-10 one"),
)


def has_attention(model: nn.Module) -> bool:
    """Whether `model` has an attention layer.

    That is `nn.MultiheadAttention` (torchvision's ViT), a module whose class name ends in "Attention" (timm's
    `Attention`, `WindowAttention`; Hugging Face's `ViTSelfAttention`; TorchScript ones by their original class
    name), or, in a `torch.fx` graph (an ONNX teacher as onnx2torch converts it), a softmax whose output is
    multiplied by a matrix: attention's weights applied to its values.
    """
    for m in model.modules():
        name = getattr(m, "original_name", None) or type(m).__name__
        if isinstance(m, nn.MultiheadAttention) or name.endswith("Attention"):
            return True
        if isinstance(m, torch.fx.GraphModule) and _softmax_into_matmul(m):
            return True
    return False


def _softmax_into_matmul(graph_module: torch.fx.GraphModule) -> bool:
    modules = dict(graph_module.named_modules())

    def op(node: torch.fx.Node) -> str:  # the module's class, or the function's or method's name
        if node.op == "call_module":
            return type(modules[node.target]).__name__.lower()
        return getattr(node.target, "__name__", str(node.target)).lower()

    return any("softmax" in op(n) and any(k in op(u) for u in n.users for k in ("matmul", "bmm", "einsum"))
               for n in graph_module.graph.nodes if n.op.startswith("call_"))


def _effective(counts: torch.Tensor) -> float:
    p = counts.float() / counts.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def profile(teacher: Any, device: torch.device | str = "cpu") -> Profile:
    """Measure `teacher` (a `dfkd.teacher.Teacher` or ensemble): spec, size, BN, answers on random inputs.

    Draws from its own seeded generator, so the run's RNG streams are untouched and the profile depends on the
    teacher alone.
    """
    spec = teacher.spec
    gen = torch.Generator().manual_seed(PROBE_SEED)
    logits = torch.cat([teacher(torch.randn(spec.shape(PROBE_BATCH),
                                            generator=gen).to(device)).float().cpu()
                        for _ in range(PROBE_BATCHES)])
    if not torch.isfinite(logits).all():
        raise DfkdError(f"--method auto: teacher {teacher.source} gives non-finite logits on random inputs; name a "
                        "method with --method (see `dfkd methods`)")
    counts = torch.bincount(logits.argmax(1), minlength=logits.shape[1])
    return Profile(spec.channels, spec.size, str(input_kind(spec)), teacher_size(teacher), multiply_adds(teacher),
                   bool(teacher.bn_paths()), has_attention(teacher), int(logits.shape[1]), float(logits.std(1).mean()),
                   _effective(counts), float(logits.softmax(1).max(1).values.mean()),
                   None if spec.square else spec.width)


def for_source(cfg: Any) -> Any:
    """`cfg` with "auto" replaced by the method of a data source that has its own (transfer data, real images)."""
    from dfkd.sources import source_for

    own = source_for(cfg).method if cfg.method == AUTO else None
    return replace(cfg, method=own) if own else cfg


def choose(prof: Profile) -> Rule:
    """The first row of `RULES` whose condition holds on `prof`."""
    return next(rule for rule in RULES if rule.test(prof))


def resolve(cfg: Any, teacher: Any, device: torch.device | str = "cpu") -> tuple[Any, str | None]:
    """`cfg` with `method` "auto" replaced by the chosen method; and the start-up line (None when not auto).

    The choice (method, recipe, the row, the profile) is kept in `cfg.auto_choice`. What the row sets (a recipe,
    other settings) goes into `params` where the user did not set it; `set_by_auto` lists those keys, so the
    recipe lines credit auto and not the user. A recipe the user names other than the row's drops the row's
    settings too (they were measured with the row's recipe).

    Raises:
        DfkdError: when a `-p` setting the user gave is not one of the chosen method's.
    """
    if cfg.method != AUTO:
        return cfg, None
    prof = profile(teacher, device)
    rule = choose(prof)
    _check_params(rule, cfg.params)
    given = cfg.params.get("recipe")
    row = rule.settings() if given in (None, rule.recipe) else {}  # a recipe of the user's: not the row's settings
    ours = {k: v for k, v in row.items() if k not in cfg.params}
    params = {**cfg.params, **ours}
    choice = {"method": rule.method, "recipe": params.get("recipe"), "rule": rule.when, "evidence": rule.evidence,
              "recipe_by_auto": "recipe" in ours, "set_by_auto": sorted(ours), "profile": asdict(prof)}
    recipe = f" (recipe {params['recipe']})" if rule.recipe else ""
    extra = "".join(f" -p {k}={v}" for k, v in ours.items() if k != "recipe")
    line = (f"auto: chose {rule.method}{recipe}{' with' + extra if extra else ''}: {rule.when} [{prof.words()}]; "
            f"evidence: {rule.evidence}")
    return replace(cfg, method=rule.method, params=params, auto_choice=choice), line


def set_by_auto(choice: dict[str, Any] | None) -> tuple[str, ...]:
    """The settings keys `--method auto` set in a run's params (from `cfg.auto_choice`; () when not auto).

    Runs made before rows set settings other than the recipe record only `recipe_by_auto`.
    """
    if not choice:
        return ()
    if "set_by_auto" in choice:
        return tuple(choice["set_by_auto"])
    return ("recipe",) if choice.get("recipe_by_auto") else ()


def _check_params(rule: Rule, params: dict[str, Any]) -> None:
    from dfkd.config import check_method_params

    try:
        check_method_params(rule.method, params)
    except DfkdError as e:
        raise DfkdError(f"--method auto chose {rule.method} for this teacher ({rule.when}), and {e}; name a method "
                        "with --method") from None


def check_auto_params(params: dict[str, Any], source: str = "-p") -> None:
    """Refuse a `-p` key that no method auto may choose takes (before the teacher is loaded)."""
    from dfkd.methods import get_method
    from dfkd.validate import check_params

    methods = list(dict.fromkeys(rule.method for rule in RULES))
    recipes = {m: get_method(m).default_params(None) for m in methods}
    unknown = sorted(set(params) - set().union(*recipes.values()))
    if unknown:
        raise DfkdError(f"{source}: no method --method auto may choose ({', '.join(methods)}) has parameter(s) "
                        f"{unknown}; name a method with --method (see `dfkd methods --params NAME`)")
    for method, recipe in recipes.items():  # each value's type and range, as the methods that take it need
        check_params({k: v for k, v in params.items() if k in recipe}, recipe, method, source)


def describe() -> str:
    """`dfkd methods`' line for auto."""
    return "picks a method (and recipe) from the teacher's measured properties (the default; --params auto: the rule)"


def rule_lines() -> list[str]:
    """`dfkd methods --params auto`: the table, one row a paragraph."""
    lines = [(__doc__ or "").strip(), "", "Rows (first match wins):"]
    for i, rule in enumerate(RULES, 1):
        recipe = f", recipe {rule.recipe}" if rule.recipe else ""
        extra = "".join(f", {k} {v}" for k, v in rule.params.items())
        lines += [f"  {i}. {rule.when} -> {rule.method}{recipe}{extra}", f"     evidence: {rule.evidence}"]
    return lines
