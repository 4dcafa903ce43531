"""childopt: fused masked AdamW optimizers for child-network fine-tuning."""
from childopt.deltas import SparseDelta
from childopt.optim import ChildTuningAdamW, MaskedAdamW

__all__ = ["MaskedAdamW", "ChildTuningAdamW", "SparseDelta"]
__version__ = "0.1.0"
