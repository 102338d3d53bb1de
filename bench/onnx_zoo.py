"""Manual check: do common networks, exported to ONNX as their owners would, load as dfkd teachers?

    OMP_NUM_THREADS=2 python bench/onnx_zoo.py                  # the table below, about 2 minutes on a CPU
    OMP_NUM_THREADS=2 python bench/onnx_zoo.py --nets resnet18 timm_vit

Each network (torchvision and timm, randomly initialised, 10 classes, 3x32x32 inputs) is exported four ways:
torch.onnx.export with `dynamo=True` (torch's default exporter) and `dynamo=False` (the TorchScript-based one),
each at their default opset, with a dynamic batch dimension and at a fixed batch of 1 (no `dynamic_shapes` /
`dynamic_axes`, as a quick export is often made). Each file is loaded with `dfkd.teacher.load_teacher` and its
logits on 3 random images compared with the source network's. A cell says `loads` (within 1e-3 of the largest
logit), `loads per image (vmap)` (its fixed batch is baked in beyond what dfkd can free, so it runs one image at a
time, vectorised with torch.func.vmap; `(loop)` where vmap cannot), `WRONG` (loads with other logits), `one image
at a time` (refused with the re-export hint), or the start of the error. Needs the dev extras (timm, onnx, onnxscript,
onnx2torch). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's dfkd, not an installed one


def networks() -> dict[str, Callable[[], nn.Module]]:
    import timm
    import torchvision

    tv = torchvision.models
    return {
        "resnet18": lambda: tv.resnet18(num_classes=10),
        "mobilenet_v3_small": lambda: tv.mobilenet_v3_small(num_classes=10),
        "efficientnet_b0": lambda: tv.efficientnet_b0(num_classes=10),
        "regnet_y_400mf": lambda: tv.regnet_y_400mf(num_classes=10),
        "convnext_tiny": lambda: tv.convnext_tiny(num_classes=10),
        "timm_resnet18": lambda: timm.create_model("resnet18", num_classes=10),
        "timm_vit": lambda: timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8,
                                              embed_dim=64, depth=2, num_heads=2),
        "timm_deit": lambda: timm.create_model("deit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8,
                                               depth=2),
        "timm_swin": lambda: timm.create_model("swin_tiny_patch4_window7_224", num_classes=10, img_size=32,
                                               window_size=4, embed_dim=24, depths=(1, 1), num_heads=(1, 1)),
        "timm_mobilevit_xxs": lambda: timm.create_model("mobilevit_xxs", num_classes=10),
        "timm_bit": lambda: timm.create_model("resnetv2_50x1_bit", num_classes=10),  # standardised convolutions
    }


EXPORTS = {
    "dynamo, dynamic batch": (True, 2), "dynamo, batch 1": (True, 1),
    "legacy, dynamic batch": (False, 2), "legacy, batch 1": (False, 1),
}


def export(model: nn.Module, path: Path, dynamo: bool, batch: int) -> None:
    kw: dict = {}
    if batch != 1:
        kw = {"dynamic_shapes": ({0: torch.export.Dim("batch")},)} if dynamo else \
            {"input_names": ["x"], "dynamic_axes": {"x": {0: "n"}}}
    torch.onnx.export(model, (torch.randn(batch, 3, 32, 32),), str(path), dynamo=dynamo, verbose=False, **kw)


def cell(model: nn.Module, path: Path) -> str:
    from dfkd.errors import DfkdError
    from dfkd.spec import InputSpec
    from dfkd.teacher import load_teacher

    try:
        teacher = load_teacher(path, spec=InputSpec(3, 32, (0.5,) * 3, (0.25,) * 3))
    except DfkdError as e:
        text = str(e)
        return "one image at a time" if "one image at a time" in text else "fails: " + text[text.find("("):][:50]
    from dfkd.perimage import PerImage

    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        diff = float((teacher(x) - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    how = "" if not isinstance(teacher.module, PerImage) else \
        " per image (vmap)" if teacher.module.vectorised else " per image (loop)"
    return f"loads{how}" if diff < 1e-3 else f"WRONG ({diff:.1e})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", nargs="*", help="a subset of the networks (default: all)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    nets = networks()
    print("| network | " + " | ".join(EXPORTS) + " |")
    print("|---|" + "---|" * len(EXPORTS))
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.nets or nets:
            torch.manual_seed(0)
            model, cells = nets[name]().eval(), []
            for i, (dynamo, batch) in enumerate(EXPORTS.values()):
                path = Path(tmp) / f"{name}-{i}.onnx"
                try:
                    export(model, path, dynamo, batch)
                except Exception as e:  # noqa: BLE001 - the exporter's own failure, reported in the cell
                    cells.append(f"export fails ({type(e).__name__})")
                    continue
                cells.append(cell(model, path))
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
