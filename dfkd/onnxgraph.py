"""An ONNX graph as onnx2torch can convert it: newer opsets taken down to the one it reads, same function.

torch.onnx.export writes opset 18 or later by default, with either of its exporters (`dynamo=True`, the default,
and `dynamo=False`, in the torch this project installs). onnx2torch (1.5) reads up to `ONNX2TORCH_OPSET`: it has no
converter for the newer versions of Reshape, Reduce*, Shape, Pad, Split or Resize, nor for Gelu and Mish, and
refuses a Reshape with `allowzero=1`, which the dynamo exporter writes for every flatten. `for_onnx2torch` therefore

0. computes, once, the convolution weights a graph computes from its own constants (a standardised convolution,
   as in BiT and NFNets, or weight normalisation) with onnx's reference evaluator, at the file's opset, and stores
   them as initializers: onnx2torch reads a convolution's weights only from an initializer;
1. writes each operator that has no earlier version (Gelu, opset 20; Mish, opset 18) as the formula that defines
   it, from operators every opset has (`DECOMPOSED`);
2. holds back from onnx's version converter the nodes of operators it has no down-adapter for, where the node
   computes what the operator's older version does (`SAME_WHEN`: a Pad without the axes input of opset 18 or the
   wrap mode of opset 19; a Split into given sizes or equal parts; a ConstantOfShape of an older element type),
   and converts the rest of the graph down (a graph it still cannot convert is kept as it is: onnx2torch may take
   it anyway);
3. sets `allowzero` to 0 on each Reshape to a constant shape without a 0 (the attribute only changes what a 0 in
   the shape means);
4. drops the Identity nodes through which torch's exporter shares one weight between layers (onnx2torch reads a
   convolution's weights only from an initializer), pointing their readers at the initializer itself;
5. hands each LayerNormalization its scale and bias through Constant nodes, so that onnx2torch normalises over the
   input's actual trailing dimensions (with initializers it builds an nn.LayerNorm from the shape inference gives,
   which is 0 for a symbolic dimension, and the ViTs of the legacy exporter failed with "Expected weight to be of
   same shape as normalized_shape");
6. frees a batch dimension exported as a fixed 1 (`torch.onnx.export` without `dynamic_shapes`), where the graph
   bakes it only into Reshape targets: a constant target that starts with the batch's 1 (and has no -1) gets -1
   there, which is the same shape at batch 1 and the batch at any other. What else bakes it in (a ViT's class
   token concatenated at batch 1) still fails at batch 2: `dfkd.teacher` then runs the graph one image at a time
   (`dfkd.perimage`), and checks that every image's logits in a batch are its logits alone.

All of it is graph surgery through onnx's public API (`onnx.helper`, `onnx.numpy_helper`,
`onnx.version_converter`); no code from the file runs.

A graph converted from Keras (tf2onnx without `--inputs-as-nchw`) takes channels-last (N, H, W, C) images; dfkd
feeds (N, C, H, W). `takes_channels_last` reads that from the graph's declared input shape, and
`ChannelsLastInput` wraps the converted module so it takes dfkd's layout.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from dfkd.errors import DfkdError

#: The newest ONNX opset whose operators onnx2torch (1.5) converts; newer graphs are converted down to it.
ONNX2TORCH_OPSET = 17
#: The domain a held-back node sits in while the version converter runs (a domain it leaves alone).
_HELD = "dfkd.held"

#: Tensor element types newer than opset 17's ConstantOfShape (bfloat16 and the float8s).
_NEW_TYPES = frozenset({16, 17, 18, 19, 20})

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
    # opset 18 added the axes input, 19 the wrap mode
    "Pad": lambda node: len(node.input) < 4 and _attr(node, "mode", "constant") != "wrap",
    # opset 18 added num_outputs (dropped on the way back): equal parts, which opset 13 makes of a Split without sizes
    "Split": lambda node: len(node.input) == 2 or _ints(node, "num_outputs", len(node.output)) == len(node.output),
    # opset 20 added bfloat16 and float8 values
    "ConstantOfShape": lambda node: _value_type(node) not in _NEW_TYPES,
}
#: Split's attribute that opset 17 does not have.
_NEWER_ATTRIBUTES = {"Split": ("num_outputs",)}


def for_onnx2torch(model: Any) -> Any:
    """`model` (an onnx ModelProto, changed in place) as onnx2torch can convert it; see the module docstring."""
    from onnx import version_converter

    try:  # at the file's own opset, which onnx's reference evaluator implements
        _fold_computed_weights(model)
    except Exception:  # noqa: BLE001 - an operator the evaluator lacks: onnx2torch may still take the graph
        pass
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
                kept_attributes = [a for a in node.attribute if a.name not in _NEWER_ATTRIBUTES.get(node.op_type, ())]
                del node.attribute[:]
                node.attribute.extend(kept_attributes)
        kept = [o for o in model.opset_import if o.domain != _HELD]
        del model.opset_import[:]
        model.opset_import.extend(kept)
    _drop_allowzero(model)
    _share_weights_directly(model)
    _layer_norm_at_run_time(model)
    _free_batch_of_one(model)
    return model


def _set_nodes(model: Any, nodes: list[Any]) -> None:
    """Replace the graph's node list (in place) with `nodes`."""
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _no(node: Any) -> bool:
    return False


def _ints(node: Any, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _value_type(node: Any) -> int | None:
    return next((a.t.data_type for a in node.attribute if a.name == "value"), None)


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
        if write is None:
            nodes.append(node)
            continue
        for new in write(node, f"dfkd_{node.op_type.lower()}{i}_", names):
            new.name = f"dfkd_{new.output[0]}"  # onnx2torch keys nodes by name: unnamed ones can collide
            nodes.append(new)
    _set_nodes(model, nodes)


def _share_weights_directly(model: Any) -> None:
    """Remove each Identity of an initializer (unless it names a graph output); its readers read the initializer."""
    weights = {t.name for t in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    alias = {n.output[0]: n.input[0] for n in model.graph.node
             if n.op_type == "Identity" and n.input[0] in weights and n.output[0] not in outputs}
    if not alias:
        return
    kept = [n for n in model.graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    _set_nodes(model, kept)


def _layer_norm_at_run_time(model: Any) -> None:
    """Each LayerNormalization's initializer inputs (scale, bias) read through Constant nodes of the same value."""
    from onnx import TensorProto, helper

    weights = {t.name: t for t in model.graph.initializer}
    constants = []
    for i, node in enumerate(model.graph.node):
        if node.op_type != "LayerNormalization":
            continue
        for j in range(1, len(node.input)):
            if node.input[j] in weights:
                name = f"dfkd_ln{i}_{j}"
                value = TensorProto()
                value.CopyFrom(weights[node.input[j]])
                value.name = name  # onnx2torch keys a Constant by its tensor's name: one per node
                constants.append(helper.make_node("Constant", [], [name], name=name, value=value))
                node.input[j] = name
    if constants:
        nodes = [*constants, *model.graph.node]
        _set_nodes(model, nodes)


#: Operators whose output is not a function of their inputs: never computed ahead.
_RANDOM = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                     "Bernoulli", "Dropout"})


def _fold_computed_weights(model: Any) -> None:
    """Convolution weights and biases computed from constants alone, evaluated once and stored as initializers."""
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    weights = {t.name for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    wanted = [x for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")
              for x in n.input[1:] if x and x not in weights]
    needed: set[int] = set()  # ids: protobuf messages compare by content, which is slow for big constants
    computable = []
    for value in dict.fromkeys(wanted):
        nodes = _constant_ancestry(value, weights, producer)
        if nodes is not None:
            computable.append(value)
            needed |= {id(n) for n in nodes}
    if not computable:
        return
    order = [n for n in model.graph.node if id(n) in needed]
    outputs = [helper.make_tensor_value_info(v, TensorProto.UNDEFINED, None) for v in computable]
    sub = helper.make_model(helper.make_graph(order, "dfkd_fold", [], outputs, list(model.graph.initializer)),
                            opset_imports=list(model.opset_import), ir_version=model.ir_version)
    values = ReferenceEvaluator(sub).run(None, {})
    model.graph.initializer.extend(numpy_helper.from_array(np.asarray(v), name) for name, v in zip(computable, values))
    # A computing node stays only where something else still reads one of its outputs that was not stored.
    done = set(computable)
    read = {x for n in model.graph.node if id(n) not in needed for x in n.input} | {o.name for o in model.graph.output}
    dropped = set()
    for node in reversed(order):
        if any(o in read and o not in done for o in node.output):
            read.update(node.input)
        else:
            dropped.add(id(node))
    kept = [n for n in model.graph.node if id(n) not in dropped]
    _set_nodes(model, kept)


def _constant_ancestry(value: str, weights: set[str], producer: dict[str, Any]) -> list[Any] | None:
    """The nodes that compute `value` from initializers alone, or None when it depends on anything else."""
    nodes, stack, seen = [], [value], set()
    while stack:
        v = stack.pop()
        if not v or v in weights or v in seen:
            continue
        node = producer.get(v)
        if node is None or node.op_type in _RANDOM or node.domain not in ("", "ai.onnx"):
            return None  # a graph input, a random draw, or an operator of another domain
        seen.add(v)
        nodes.append(node)
        stack.extend(node.input)
    return nodes


def _image_input(model: Any) -> Any | None:
    """The graph's one input that is not a weight, or None."""
    weights = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    return inputs[0] if len(inputs) == 1 else None


def _free_batch_of_one(model: Any) -> None:
    """A batch dimension fixed to 1 made symbolic, and Reshape targets that start with it made to start with -1."""
    from onnx import numpy_helper

    image = _image_input(model)
    dims = image.type.tensor_type.shape.dim if image is not None else []
    if not dims or not dims[0].HasField("dim_value") or dims[0].dim_value != 1:
        return
    for value in (image, *model.graph.output):
        shape = value.type.tensor_type.shape.dim
        if shape and shape[0].HasField("dim_value") and shape[0].dim_value == 1:
            shape[0].dim_param = "batch"
    for i, (node, target) in enumerate(_reshape_targets(model)):
        if target.ndim == 1 and len(target) >= 2 and target[0] == 1 and -1 not in target:
            freed = target.copy()
            freed[0] = -1
            name = f"dfkd_batch_{i}"
            model.graph.initializer.append(numpy_helper.from_array(freed, name))
            node.input[1] = name


def _drop_allowzero(model: Any) -> None:
    """allowzero=0 on each Reshape whose target shape is a constant without a 0 (the same result)."""
    for node, target in _reshape_targets(model):
        if (target != 0).all():
            for a in node.attribute:
                if a.name == "allowzero":
                    a.i = 0


def _reshape_targets(model: Any) -> list[tuple[Any, np.ndarray]]:
    """Each Reshape whose target shape is a constant (an initializer or a Constant node's), with that shape."""
    from onnx import numpy_helper

    tensors = {t.name: t for t in model.graph.initializer}
    tensors.update({n.output[0]: a.t for n in model.graph.node if n.op_type == "Constant"
                    for a in n.attribute if a.name == "value"})
    return [(n, numpy_helper.to_array(tensors[n.input[1]])) for n in model.graph.node
            if n.op_type == "Reshape" and len(n.input) > 1 and n.input[1] in tensors]


def takes_channels_last(model: Any, channels: int, hw: tuple[int, int]) -> bool:
    """True when the graph's one image input is declared (N, H, W, C) for this spec and not (N, C, H, W).

    A dimension the graph leaves symbolic fits any size.
    """
    image = _image_input(model)
    if image is None or len(image.type.tensor_type.shape.dim) != 4:
        return False
    dims = [d.dim_value if d.HasField("dim_value") else None for d in image.type.tensor_type.shape.dim[1:]]

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


class OnnxRuntimeModule(nn.Module):
    """An ONNX model run by onnxruntime on the CPU: logits, but no gradients (an int8 QDQ model, say).

    A graph with a fixed batch size is fed in chunks of that size (the last one padded).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        from dfkd.export import require

        ort = require("onnxruntime")
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, providers=["CPUExecutionProvider"])
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        batch = first.shape[0] if first.shape else None
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise DfkdError(f"{self.path}: an int8 ONNX model passes no gradients, which this method needs; give the "
                            "float model it was made from (student.pt, or the model dfkd quantize read)")
        a = x.detach().float().cpu().numpy()
        size = self.fixed_batch or len(a)
        outs = []
        for i in range(0, len(a), size):
            chunk = a[i:i + size]
            pad = size - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            outs.append(self.session.run(None, {self.input_name: chunk})[0][:size - pad])
        return torch.from_numpy(np.concatenate(outs)).to(x.device)
