"""Teacher architectures of the cross-teacher benchmark that are not in dfkd's zoo, and how they are trained.

A user who trained such a network holds a `state_dict` and the code of its class; dfkd takes both as
`--teacher FILE --teacher-arch bench.teacher_nets:CLASS` plus the input spec (`--channels --input-size --mean
--std`), importing the class from the repository root. The benchmark hands its teachers over the same way.

    OMP_NUM_THREADS=1 python -m bench.teacher_nets FashionCNN fashion_mnist OUT.pt   # a state_dict

Training is plain supervised cross-entropy with SGD (AdamW for the ViT), a one-cycle schedule and random +-2 px
shifts, seeded and on one thread, so the same command writes the same weights.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
#: Per-dataset input normalisation (the training pixels' mean and std in [0, 1] units) and files.
DATASETS = {
    "mnist": {"mean": 0.1307, "std": 0.3081, "train": "mnist_train.npz", "test": "mnist_test.npz"},
    "fashion_mnist": {"mean": 0.2860, "std": 0.3530, "train": "fashion_mnist_train.npz",
                      "test": "fashion_mnist_test.npz"},
}


class FashionCNN(nn.Module):
    """Two conv-BN-ReLU-pool stages (16, 32 channels) and two linear layers, for 28x28 grey images (~207K params).

    Shape:
        - x: (B, 1, 28, 28) -> (B, num_classes)
    """

    def __init__(self, num_classes: int = 10, bn: bool = True) -> None:
        super().__init__()

        def stage(cin: int, cout: int) -> list[nn.Module]:
            norm = [nn.BatchNorm2d(cout)] if bn else []
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=not bn), *norm, nn.ReLU(), nn.MaxPool2d(2)]

        self.features = nn.Sequential(*stage(1, 16), *stage(16, 32))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(),
                                        nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class PlainFashionCNN(FashionCNN):
    """`FashionCNN` without BatchNorm (biased convolutions instead), for 28x28 grey images (~207K params).

    Shape:
        - x: (B, 1, 28, 28) -> (B, num_classes)
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(num_classes, bn=False)


class CaffeLeNet(nn.Module):
    """Caffe's MNIST LeNet: conv 20-50 (5x5, no padding, no BatchNorm), FC 500, for 28x28 grey images (~431K params).

    Shape:
        - x: (B, 1, 28, 28) -> (B, num_classes)
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(50 * 4 * 4, 500), nn.ReLU(),
                                        nn.Linear(500, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class PlainVGG(nn.Module):
    """A VGG-style net without BatchNorm: conv 32-32, 64-64, 128 (3x3, biased, each pair then a 2x2 max-pool), FC 256,
    for 28x28 grey images (~0.44M params, ~22M multiply-adds an image: a heavy BN-free teacher).

    Shape:
        - x: (B, 1, 28, 28) -> (B, num_classes)
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]

        self.features = nn.Sequential(*conv(1, 32), *conv(32, 32), nn.MaxPool2d(2), *conv(32, 64), *conv(64, 64),
                                      nn.MaxPool2d(2), *conv(64, 128), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(128 * 3 * 3, 256), nn.ReLU(),
                                        nn.Linear(256, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """A multi-layer perceptron: 784-512-256 (ReLU, no BatchNorm, no convolution), for 28x28 grey images (~0.54M
    params): a teacher with no spatial prior at all, which a generator's high-frequency patterns can fool.

    Shape:
        - x: (B, 1, 28, 28) -> (B, num_classes)
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                                 nn.Linear(256, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class WideCNN(nn.Module):
    """Two conv-ReLU-pool stages (16, 32 channels, no BatchNorm) and a Linear over the whole 32x7x14 map, so it
    takes 28x56 grey images only (~415K params): a teacher whose inputs are not square (`--input-size 28x56`);
    it trains on the dataset's 28x28 images resized to 28x56 (`INPUT_SIZES`).

    Shape:
        - x: (B, 1, 28, 56) -> (B, num_classes)
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 14, 128), nn.ReLU(),
                                        nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


#: A timm vision transformer as a user would build it for 28x28 grey images: 4-px patches (49 tokens and a class
#: token), width 64, 4 blocks of 4 heads, MLP ratio 2, LayerNorm and GELU (139K parameters, 6.6M multiply-adds an
#: image): a teacher with attention instead of convolution and no BatchNorm. dfkd takes it as
#: `--teacher-arch timm:vit_tiny_patch16_224` with these as `--arch-arg KEY=VALUE`.
VIT_NAME = "vit_tiny_patch16_224"
VIT_ARGS = {"img_size": 28, "patch_size": 4, "in_chans": 1, "embed_dim": 64, "depth": 4, "num_heads": 4,
            "mlp_ratio": 2.0}


def vit(num_classes: int = 10) -> nn.Module:
    """The benchmark's ViT (`VIT_NAME` with `VIT_ARGS`); needs timm (`pip install -e ".[timm]"`)."""
    import timm

    return timm.create_model(VIT_NAME, pretrained=False, num_classes=num_classes, **VIT_ARGS)


NETS = {"FashionCNN": FashionCNN, "PlainFashionCNN": PlainFashionCNN, "CaffeLeNet": CaffeLeNet,
        "PlainVGG": PlainVGG, "MLP": MLP, "ViT": vit, "WideCNN": WideCNN}
#: (height, width) of the nets that do not take the datasets' 28x28 images (their data is resized to it).
INPUT_SIZES = {"WideCNN": (28, 56)}
#: Nets trained with AdamW (lr 2e-3, weight decay 0.05, 10 % warm-up) instead of SGD: a ViT trained from scratch
#: with the CNNs' SGD recipe learns far less in the same epochs.
ADAMW = {"ViT"}


def load_split(dataset: str, split: str, hw: tuple[int, int] = (28, 28)) -> tuple[torch.Tensor, torch.Tensor]:
    """(x normalised float (N, 1, H, W), y int64) of a 28x28 grey dataset in ../shared/data, resized to `hw` as
    dfkd resizes evaluation data (bilinear, antialiased)."""
    d = DATASETS[dataset]
    with np.load(DATA / d[split]) as z:
        x = torch.from_numpy(z["x"]).float().div_(255.0).unsqueeze(1)
        y = torch.from_numpy(z["y"]).long()
    if tuple(x.shape[-2:]) != tuple(hw):
        x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True)
    return (x - d["mean"]) / d["std"], y


def shift(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Each batch shifted by one random offset of up to `pad` pixels (background fill)."""
    dy, dx = (int(v) for v in torch.randint(-pad, pad + 1, (2,), generator=gen))
    return torch.roll(x, (dy, dx), (2, 3))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of `model` (eval mode) on (x, y)."""
    model.eval()
    hits = sum(int((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum()) for i in range(0, len(x), 1000))
    return hits / len(x)


def train(arch: str, dataset: str, epochs: int = 4, seed: int = 0,
          lr: float | None = None) -> tuple[nn.Module, float]:
    """Train NETS[arch] on `dataset`'s training split; returns (model, test top-1). `lr`: the one-cycle peak
    (default 0.05 with SGD, 2e-3 with AdamW)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = NETS[arch]()
    hw = INPUT_SIZES.get(arch, (28, 28))
    x, y = load_split(dataset, "train", hw)
    steps = epochs * (len(x) // 128)
    if arch in ADAMW:
        lr = lr or 2e-3
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    else:
        lr = lr or 0.05
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.1 if arch in ADAMW else 0.3)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for i in range(len(x) // 128):
            idx = order[i * 128:(i + 1) * 128]
            loss = F.cross_entropy(model(shift(x[idx], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model, accuracy(model, *load_split(dataset, "test", hw))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("arch", choices=sorted(NETS))
    ap.add_argument("dataset", choices=sorted(DATASETS))
    ap.add_argument("out")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, top1 = train(args.arch, args.dataset, args.epochs, args.seed)
    tmp = Path(args.out).with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, args.out)
    print(f"{args.arch} on {args.dataset}: test top-1 {100 * top1:.2f}% -> {args.out}")


if __name__ == "__main__":
    main()
