"""The usage example of childopt.analysis's docstring runs as written, its ``...`` step filled in."""
import re
import textwrap

import torch

import childopt.analysis
from childopt import MaskedAdamW
from childopt.analysis import FISHER, SHARE, UPDATE, read_csv
from tests.analysis.models import tiny_bert

FILLED = ("scores = {n: torch.rand(p.shape) for n, p in model.named_parameters()}\n"
          "optimizer = MaskedAdamW(model.named_parameters(), lr=1e-3, mask={n: s > 0.5 for n, s in scores.items()})")


def test_the_package_docstring_example_runs(tmp_path, monkeypatch):
    doc = childopt.analysis.__doc__
    example = textwrap.dedent(doc[doc.index("    from childopt.analysis"):])
    example = re.sub(r"^\.\.\. .*$", FILLED, example, count=1, flags=re.M)
    monkeypatch.chdir(tmp_path)
    exec(example, {"model": tiny_bert(), "torch": torch, "MaskedAdamW": MaskedAdamW})
    assert list(read_csv(tmp_path / "heads.csv")) == [FISHER, SHARE, UPDATE]
    assert (tmp_path / "heatmaps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
