"""Synthesis families (installed as `dfkd.generators`): GAN generators, inversion, Dirichlet sampling."""

from dfkd.generators.base import LossDict, Synthesizer
from dfkd.generators.dcgan import GENERATORS, Generator, default_width
from dfkd.generators.gan import GeneratorSynthesizer

__all__ = ["GENERATORS", "Generator", "GeneratorSynthesizer", "LossDict", "Synthesizer", "default_width"]
from dfkd.generators.contrastive import ContrastiveCritic, ContrastiveSynthesizer, MemoryBank  # noqa: E402
from dfkd.generators.latent import LatentSynthesizer, optimise_latent, reinit_  # noqa: E402
from dfkd.generators.meta import MetaSynthesizer  # noqa: E402

__all__ += ["ContrastiveCritic", "ContrastiveSynthesizer", "LatentSynthesizer", "MemoryBank", "MetaSynthesizer",
            "optimise_latent", "reinit_"]
