"""msdm: Multi-Source Diffusion Models (Mariani et al., ICLR 2024) in plain PyTorch.

One score model of the joint distribution of aligned stems; generation, imputation and
separation are closures over one sampler. This package never imports Ray.
"""

from .checkpoint import load_checkpoint, load_factorized
from .config import Config, load_config
from .diffusion import Denoiser, FactorizedDenoiser, GaussianDenoiser
from .sampling import SamplerConfig
from .separator import Separator
from .tasks import generate, impute, separate

__version__ = "0.1.0"

__all__ = [
    "Config",
    "Denoiser",
    "FactorizedDenoiser",
    "GaussianDenoiser",
    "SamplerConfig",
    "Separator",
    "generate",
    "impute",
    "load_checkpoint",
    "load_config",
    "load_factorized",
    "separate",
]
