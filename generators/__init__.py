"""Synthesis families (installed as `dfkd.generators`): GAN generators, inversion, Dirichlet sampling."""

from dfkd.generators.base import LossDict, Synthesizer
from dfkd.generators.dcgan import GENERATORS, Generator, default_width
from dfkd.generators.gan import GeneratorSynthesizer

__all__ = ["GENERATORS", "Generator", "GeneratorSynthesizer", "LossDict", "Synthesizer", "default_width"]
from dfkd.generators.inversion import InversionSynthesizer, balanced_targets  # noqa: E402
from dfkd.generators.pool import ImagePool  # noqa: E402

__all__ += ["ImagePool", "InversionSynthesizer", "balanced_targets"]
from dfkd.generators.dirichlet import DirichletSynthesizer, class_similarity, dirichlet_targets  # noqa: E402

__all__ += ["DirichletSynthesizer", "class_similarity", "dirichlet_targets"]
from dfkd.generators.realdata import RealData  # noqa: E402

__all__ += ["RealData"]
from dfkd.generators.contrastive import ContrastiveCritic, ContrastiveSynthesizer, MemoryBank  # noqa: E402
from dfkd.generators.latent import LatentSynthesizer, optimise_latent, reinit_  # noqa: E402
from dfkd.generators.meta import MetaSynthesizer  # noqa: E402

__all__ += ["ContrastiveCritic", "ContrastiveSynthesizer", "LatentSynthesizer", "MemoryBank", "MetaSynthesizer",
            "optimise_latent", "reinit_"]
