"""Backend selection: auto's choice, the CHILDOPT_BACKEND override and bad names."""
import logging

import pytest
import torch

from childopt import MaskedAdamW, backends


def test_auto_uses_reference_for_cpu_tensors_even_when_triton_is_interpreted(caplog, monkeypatch):
    from childopt import _native

    monkeypatch.setattr(_native, "try_load", lambda build=True: (None, "no build in the cache"))
    backends._announced.clear()
    with caplog.at_level(logging.INFO, logger="childopt"):
        assert backends.create("auto", torch.device("cpu")).name == "reference"
    assert "backend 'reference' for cpu tensors" in caplog.text
    assert "native: childopt._C is not available (no build in the cache)" in caplog.text
    assert "triton: not used automatically for cpu tensors" in caplog.text


def test_environment_overrides_auto(monkeypatch):
    monkeypatch.setenv("CHILDOPT_BACKEND", "reference")
    opt = MaskedAdamW([torch.nn.Parameter(torch.ones(2))], seed=0)
    assert opt.backend_name() == "reference"
    monkeypatch.setenv("CHILDOPT_BACKEND", "fastest")
    with pytest.raises(ValueError, match="CHILDOPT_BACKEND must be one of"):
        backends.create("auto", torch.device("cpu"))


def test_unknown_backend_name_lists_the_choices():
    with pytest.raises(ValueError, match="backend must be one of \\('auto', 'reference', 'triton', 'native'\\)"):
        backends.check_name("native-fast")
