"""The optimizers: :class:`MaskedAdamW` and :class:`ChildTuningAdamW`, and their layers.

* ``masked_adamw`` / ``childtuning``: the ``torch.optim`` surface (groups, step, masks, state
  dicts, hooks);
* ``functional``: the step as a pure function over tensor lists (bucketing, step scalars, one
  backend op per bucket);
* ``state``: the dense and sparse state layouts; ``checkpoint``: state dicts;
* ``params`` and ``validation``: naming parameters, resolving masks, checking arguments;
* ``importance_mask``: ``mask="importance"`` (:class:`Importance`) and the refresh of its draw.
"""
from childopt.optim.childtuning import ChildTuningAdamW
from childopt.optim.importance_mask import Importance
from childopt.optim.masked_adamw import MaskedAdamW

__all__ = ["MaskedAdamW", "ChildTuningAdamW", "Importance"]
