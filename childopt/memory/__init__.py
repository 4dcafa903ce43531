"""``python -m childopt memory``: the peak memory per device of a fine-tuning method, before training.

childopt.memory.planner traces a training step on fake tensors (childopt.memory.trace) for a
preset or a local Hugging Face config (childopt.memory.models) and a method
(childopt.memory.methods); childopt.memory.cli prints the table and draws the bars.
"""
from childopt.memory.methods import METHODS
from childopt.memory.models import PRESETS, architecture
from childopt.memory.planner import Plan, Setting, plan

__all__ = ["METHODS", "PRESETS", "Plan", "Setting", "architecture", "plan"]
