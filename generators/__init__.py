"""Synthesis families (installed as `dfkd.generators`): GAN generators, inversion, Dirichlet sampling."""

from dfkd.generators.base import LossDict, Synthesizer
from dfkd.generators.dcgan import GENERATORS, Generator, default_width
from dfkd.generators.gan import GeneratorSynthesizer

__all__ = ["GENERATORS", "Generator", "GeneratorSynthesizer", "LossDict", "Synthesizer", "default_width"]
