"""The smoke run of ``python -m childopt finetune`` the finetune tests share: its arguments and its JSONs.

It trains the packaged all-MiniLM-L6-v2 for a few steps on 24 of the 40 training rows of tests/data/glue/RTE
with each optimizer, one process per run as the command does (the ``smoke`` fixture of conftest.py).
"""
import json
from pathlib import Path

FIXTURE = Path(__file__).parents[1] / "data" / "glue"
SMOKE = ["--task", "RTE", "--data-dir", str(FIXTURE), "--max-steps", "3", "--batch-size", "8", "--max-length", "48",
         "--seeds", "1", "--train-size", "24"]


def load_record(output: Path, method: str, seed: int = 1) -> dict:
    """The JSON of the RTE run of ``method`` and ``seed`` in ``output``."""
    return json.loads((output / f"RTE-{method}-lr2e-05-seed{seed}.json").read_text())
