"""childopt: fused masked AdamW optimizers for child-network fine-tuning."""
from childopt import _native
from childopt.deltas import DeltaFormatError, SparseDelta
from childopt.optim import ChildTuningAdamW, Importance, MaskedAdamW

__all__ = ["MaskedAdamW", "ChildTuningAdamW", "Importance", "SparseDelta", "DeltaFormatError"]
__version__ = "0.1.0"

# The runtime guard of an installed build: one message now if childopt._C was built for another torch.
_native.check_installed_build()
