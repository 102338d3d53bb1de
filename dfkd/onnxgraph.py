"""An ONNX graph as onnx2torch can convert it: newer opsets taken down to the one it reads, same function.

torch.onnx's current exporter (`dynamo=True`, torch.onnx.export's default in the torch this project installs)
writes opset 18 or later. onnx2torch (1.5) reads up to `ONNX2TORCH_OPSET`: it has no converter for the newer
versions of Reshape, Reduce*, Shape, Pad, Split or Resize, nor for Gelu and Mish, and refuses a Reshape with
`allowzero=1`, which that exporter writes for every flatten. `for_onnx2torch` therefore

1. writes each operator that has no earlier version (Gelu, opset 20; Mish, opset 18) as the formula that defines
   it, from operators every opset has (`DECOMPOSED`);
2. holds back from onnx's version converter the nodes of operators it has no down-adapter for, where the node
   computes what the operator's older version does (`SAME_WHEN`: a Pad without the axes input of opset 18 or the
   wrap mode of opset 19), and converts the rest of the graph down (a graph it still cannot convert is kept as it
   is: onnx2torch may take it anyway);
3. sets `allowzero` to 0 on each Reshape to a constant shape without a 0 (the attribute only changes what a 0 in
   the shape means).

All of it is graph surgery through onnx's public API (`onnx.helper`, `onnx.numpy_helper`,
`onnx.version_converter`); no code from the file runs.

A graph converted from Keras (tf2onnx without `--inputs-as-nchw`) takes channels-last (N, H, W, C) images; dfkd
feeds (N, C, H, W). `takes_channels_last` reads that from the graph's declared input shape, and
`ChannelsLastInput` wraps the converted module so it takes dfkd's layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

#: The newest ONNX opset whose operators onnx2torch (1.5) converts; newer graphs are converted down to it.
ONNX2TORCH_OPSET = 17
#: The domain a held-back node sits in while the version converter runs (a domain it leaves alone).
_HELD = "dfkd.held"

_CONSTANTS = {"half": 0.5, "one": 1.0, "sqrt2": math.sqrt(2.0), "k": math.sqrt(2.0 / math.pi), "c": 0.044715}


def _attr(node: Any, name: str, default: str) -> str:
    return next((a.s.decode() for a in node.attribute if a.name == name), default)


def _gelu(node: Any, t: str, c: dict[str, str]) -> list[Any]:
    """0.5 x (1 + erf(x / sqrt 2)), or with approximate="tanh" 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""
    from onnx import helper

    x, y = node.input[0], node.output[0]
    if _attr(node, "approximate", "none") == "tanh":
        inner = [helper.make_node("Mul", [x, x], [t + "x2"]), helper.make_node("Mul", [t + "x2", x], [t + "x3"]),
                 helper.make_node("Mul", [t + "x3", c["c"]], [t + "cx3"]),
                 helper.make_node("Add", [x, t + "cx3"], [t + "s"]),
                 helper.make_node("Mul", [t + "s", c["k"]], [t + "ks"]),
                 helper.make_node("Tanh", [t + "ks"], [t + "g"])]
    else:
        inner = [helper.make_node("Div", [x, c["sqrt2"]], [t + "d"]), helper.make_node("Erf", [t + "d"], [t + "g"])]
    return [*inner, helper.make_node("Add", [t + "g", c["one"]], [t + "p"]),
            helper.make_node("Mul", [x, t + "p"], [t + "m"]), helper.make_node("Mul", [t + "m", c["half"]], [y])]


def _mish(node: Any, t: str, c: dict[str, str]) -> list[Any]:
    """Mish(x) = x tanh(softplus(x))."""
    from onnx import helper

    x, y = node.input[0], node.output[0]
    return [helper.make_node("Softplus", [x], [t + "sp"]), helper.make_node("Tanh", [t + "sp"], [t + "th"]),
            helper.make_node("Mul", [x, t + "th"], [y])]


#: Operators with no earlier version, and the nodes (in fp32) that compute them.
DECOMPOSED: dict[str, Callable[[Any, str, dict[str, str]], list[Any]]] = {"Gelu": _gelu, "Mish": _mish}
#: Operators the version converter cannot take down, and when a node of one computes what its opset-17 version does.
SAME_WHEN: dict[str, Callable[[Any], bool]] = {
    "Pad": lambda node: len(node.input) < 4 and _attr(node, "mode", "constant") != "wrap",
}


def for_onnx2torch(model: Any) -> Any:
    """`model` (an onnx ModelProto, changed in place) as onnx2torch can convert it; see the module docstring."""
    from onnx import version_converter

    if _opset(model) > ONNX2TORCH_OPSET:
        _decompose(model)
        held = [n for n in model.graph.node if n.domain in ("", "ai.onnx") and SAME_WHEN.get(n.op_type, _no)(n)]
        for node in held:
            node.domain = _HELD
        model.opset_import.add(domain=_HELD, version=1)
        try:
            model = version_converter.convert_version(model, ONNX2TORCH_OPSET)
        except Exception:  # noqa: BLE001 - no down-adapter for some operator: onnx2torch may still take the graph
            pass
        for node in model.graph.node:
            if node.domain == _HELD:
                node.domain = ""
        kept = [o for o in model.opset_import if o.domain != _HELD]
        del model.opset_import[:]
        model.opset_import.extend(kept)
    _drop_allowzero(model)
    return model


def _no(node: Any) -> bool:
    return False


def _opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _decompose(model: Any) -> None:
    """Replace (in place) each node of a `DECOMPOSED` operator by the nodes that compute it."""
    from onnx import numpy_helper

    if not any(n.op_type in DECOMPOSED for n in model.graph.node):
        return
    names = {key: f"dfkd_{key}" for key in _CONSTANTS}
    model.graph.initializer.extend(numpy_helper.from_array(np.array(v, np.float32), names[k])
                                   for k, v in _CONSTANTS.items())
    nodes = []
    for i, node in enumerate(model.graph.node):
        write = DECOMPOSED.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        nodes += write(node, f"dfkd_{node.op_type.lower()}{i}_", names) if write else [node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _drop_allowzero(model: Any) -> None:
    """allowzero=0 on each Reshape whose target shape is a constant without a 0 (the same result)."""
    from onnx import numpy_helper

    shapes = {t.name: t for t in model.graph.initializer}
    shapes.update({n.output[0]: a.t for n in model.graph.node if n.op_type == "Constant"
                   for a in n.attribute if a.name == "value"})
    for node in model.graph.node:
        shape = shapes.get(node.input[1]) if node.op_type == "Reshape" and len(node.input) > 1 else None
        if shape is not None and (numpy_helper.to_array(shape) != 0).all():
            for a in node.attribute:
                if a.name == "allowzero":
                    a.i = 0


def takes_channels_last(model: Any, channels: int, hw: tuple[int, int]) -> bool:
    """True when the graph's one image input is declared (N, H, W, C) for this spec and not (N, C, H, W).

    A dimension the graph leaves symbolic fits any size.
    """
    weights = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    if len(inputs) != 1 or len(inputs[0].type.tensor_type.shape.dim) != 4:
        return False
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim[1:]]

    def fits(want: tuple[int, int, int]) -> bool:
        return all(d is None or d == w for d, w in zip(dims, want))

    return fits((*hw, channels)) and not fits((channels, *hw))


class ChannelsLastInput(nn.Module):
    """`module`, which takes (N, H, W, C) images, made to take (N, C, H, W) ones."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> Any:
        return self.module(x.permute(0, 2, 3, 1))
