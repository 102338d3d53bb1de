"""NAYER's noisy-layer generator and its label embeddings (Tran et al., CVPR 2024; tmtuan1307/NAYER).

The generator's input is not noise but a constant embedding of each target label; the randomness sits in a
"noisy layer", a Linear re-initialised N(0, 1) before every batch, between the embedding and the usual
Linear-BN-upsample-conv generator (`datafree/models/generator.py` `NLGenerator`). The noisy layers are K-to-1:
one layer serves a chunk of K consecutive samples, one of each class, so a batch of B images has ceil(B / K) of
them (the reference's `nl = num_classes`, `nle = ceil(sbz / nl)`).

The paper embeds "a image of <class name>" with CLIP ViT-B/32's text encoder (`label_embedding/
label_embedding.py`, 512-d). dfkd downloads nothing at run time, so by default each class gets a fixed random
vector instead (`fixed_class_embeddings`); `text_class_embeddings` uses a text encoder already on this machine
(open_clip with a weights file, or sentence-transformers with a model folder or cached model).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from dfkd.errors import DfkdError
from dfkd.generators.base import LossDict
from dfkd.generators.dcgan import Generator
from dfkd.generators.latent import LatentObjective, LatentSynthesizer, optimise_latent
from dfkd.spec import InputSpec

#: The reference's prompt (sic), with "_" and "-" in class names read as spaces.
PROMPT = "a image of {}"
#: CLIP ViT-B/32's text-embedding width, the reference's `le_size`.
CLIP_DIM = 512


def fixed_class_embeddings(num_classes: int, dim: int = CLIP_DIM, seed: int = 0) -> Tensor:
    """One fixed N(0, I) vector per class, the same for every run (a seeded generator of their own).

    Stands in for label-text embeddings when no text encoder is installed: distinct, nearly orthogonal class
    inputs, without the inter-class similarity a language model would add.

    Shape:
        - output: (num_classes, dim)
    """
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_classes, dim, generator=gen)


@contextmanager
def _offline() -> Iterator[None]:
    """Forbid Hugging Face downloads while a text encoder loads (only cached or local weights are used)."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({k: "1" for k in saved})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _encode_open_clip(model_name: str, pretrained: str, prompts: list[str]) -> Tensor:
    import open_clip

    model = open_clip.create_model(model_name, pretrained=pretrained or None)
    tokens = open_clip.get_tokenizer(model_name)(prompts)
    with torch.no_grad():
        return model.eval().encode_text(tokens).float()


def _encode_sentence(name: str, prompts: list[str]) -> Tensor:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(name, device="cpu")
    return torch.as_tensor(model.encode(prompts, convert_to_numpy=True)).float()


def text_class_embeddings(encoder: str, class_names: Sequence[str]) -> Tensor:
    """Embed "a image of <name>" for each class with a text encoder installed here (never downloaded).

    Args:
        encoder: "open_clip:MODEL:WEIGHTS_FILE" (e.g. "open_clip:ViT-B-32:/models/vit_b_32_openai.bin", the
            paper's encoder) or "sentence-transformers:NAME_OR_PATH" (a folder, or a model in the Hugging Face
            cache; loaded with HF_HUB_OFFLINE=1).
        class_names: one name per class, in class-index order.

    Returns:
        The embeddings, one row per class.

    Raises:
        DfkdError: the package or its weights are not on this machine, or the encoder is unknown.

    Shape:
        - output: (len(class_names), D)
    """
    kind, _, rest = encoder.partition(":")
    prompts = [PROMPT.format(n.replace("_", " ").replace("-", " ")) for n in class_names]
    package = {"open_clip": "open_clip_torch", "sentence-transformers": "sentence-transformers"}.get(kind)
    if package is None or not rest:
        raise DfkdError(f"-p text_encoder={encoder}: use none, open_clip:MODEL:WEIGHTS_FILE or "
                        "sentence-transformers:NAME_OR_PATH")
    try:
        with _offline():
            if kind == "open_clip":
                name, _, pretrained = rest.partition(":")
                if not os.path.isfile(os.path.expanduser(pretrained)):  # a tag would make open_clip download
                    raise DfkdError(f"-p text_encoder={encoder}: give the weights file after the model name "
                                    "(open_clip:MODEL:/path/to/weights.bin); nothing is downloaded, or use -p "
                                    "text_encoder=none")
                return _encode_open_clip(name, os.path.expanduser(pretrained), prompts)
            return _encode_sentence(rest, prompts)
    except ImportError as e:
        raise DfkdError(f"-p text_encoder={encoder}: {package} is not installed; pip install 'dfkd[text]' (or "
                        f"{package}), or use -p text_encoder=none for fixed class embeddings") from e
    except (OSError, RuntimeError, ValueError) as e:
        raise DfkdError(f"-p text_encoder={encoder}: could not load it without a download ({str(e).splitlines()[0]}"
                        "); give a local path or a model already in the cache, or -p text_encoder=none") from e


def nayer_targets(batch: int, num_classes: int) -> Tensor:
    """The reference's `generate_ys`: 0..K-1 repeated floor(B / K) times, then B mod K uniform random labels.

    Every full chunk of K consecutive samples holds each class once (what a K-to-1 noisy layer sees).

    Shape:
        - output: (batch,)
    """
    full = torch.arange(num_classes).repeat(batch // num_classes)
    return torch.cat([full, torch.randint(num_classes, (batch % num_classes,))])


class NoisyLayerGenerator(nn.Module):
    """Label embedding -> BatchNorm1d -> K-to-1 noisy Linear layers -> the zju-vipa generator.

    Args:
        spec: the teacher's input spec.
        label_emb: one embedding row per class (kept as a buffer, not learned).
        le_emb_size: output width of a noisy layer (the generator's latent size; the reference's 1000).
        ngf: generator base width.
        batch_size: the largest batch it makes (sets the number of noisy layers, ceil(batch / K)).

    Shape:
        - Input: labels y (B,), B <= batch_size, in chunks of K as `nayer_targets` makes them.
        - Output: (B, spec.channels, spec.size, spec.width), in the teacher's normalised input space.
    """

    def __init__(self, spec: InputSpec, label_emb: Tensor, le_emb_size: int, ngf: int, batch_size: int) -> None:
        super().__init__()
        self.register_buffer("label_emb", label_emb.detach().float().clone())
        self.k, dim = label_emb.shape
        self.le_bn = nn.BatchNorm1d(dim)
        self.noisy = nn.ModuleList(nn.Linear(dim, le_emb_size) for _ in range(math.ceil(batch_size / self.k)))
        self.body = Generator(spec, nz=le_emb_size, ngf=ngf, head="sigmoid")
        self.nz = le_emb_size

    def reset_noisy(self) -> None:
        """Re-draw every noisy layer: weights N(0, 1), biases 0 (the reference's `re_init_le`, once per batch)."""
        for layer in self.noisy:
            nn.init.normal_(layer.weight, 0.0, 1.0)
            nn.init.zeros_(layer.bias)

    def reset_all(self) -> None:
        """A fresh generator: PyTorch's default initialisation of every layer (the reference's `reinit()`)."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def forward(self, y: Tensor) -> Tensor:
        chunks = self.le_bn(self.label_emb[y]).split(self.k)
        if len(chunks) > len(self.noisy):
            raise ValueError(f"a batch of {len(y)} needs {len(chunks)} noisy layers, this generator has "
                             f"{len(self.noisy)}")
        return self.body(torch.cat([layer(c) for layer, c in zip(self.noisy, chunks)]))


class NoisyLayerSynthesizer(LatentSynthesizer):
    """NAYER's batch: re-drawn noisy layers, balanced targets, a fresh Adam on the whole generator, g_steps steps.

    `synthesize()` makes one batch (one of the reference's `g_loops`), puts its lowest-loss iterate into the pool
    and returns it; `sample(n)` serves augmented pool images as CMI and Fast-DFKD do.

    Args:
        generator: a `NoisyLayerGenerator`.
        objective: objective(x, y) -> (losses with "loss", None).
        pool: where each batch's best iterate goes.
        batch_size: synthesis batch.
        steps: generator iterations per batch (`g_steps`).
        num_classes: K.
        lr: the generator's Adam learning rate (`lr_g`; constant, a new optimizer every batch).
        betas: its Adam betas.
        device: where the targets live.
        sample_augment: applied to pool samples served to the student.
    """

    def __init__(self, generator: NoisyLayerGenerator, objective: LatentObjective, pool: Any, batch_size: int,
                 steps: int, num_classes: int, lr: float, betas: tuple[float, float],
                 device: torch.device | str = "cpu", sample_augment: nn.Module | None = None) -> None:
        super().__init__(generator, objective, pool, batch_size, steps, num_classes, device, sample_augment)
        self.lr, self.betas = lr, betas

    def synthesize(self) -> tuple[Tensor, LossDict]:
        self.generator.reset_noisy()
        y = nayer_targets(self.batch_size, self.num_classes).to(self.device)
        opt = torch.optim.Adam(self.generator.parameters(), lr=self.lr, betas=self.betas)
        # The labels are the generator's input and its targets: optimise_latent calls generator(y).
        best = optimise_latent(self.generator, y, y, opt, self.objective, self.steps, stop=self.stopper())
        self.pool.add(best.x)
        return best.x, best.losses
