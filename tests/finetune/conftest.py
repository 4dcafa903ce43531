"""The smoke run, once for all the finetune tests that read its JSONs, table and plot, and the tiny model folders."""
import pytest

from childopt.finetune import cli
from tests.finetune.smoke import SMOKE
from tests.finetune.tiny import tiny_model


@pytest.fixture(scope="package")
def smoke(tmp_path_factory):
    """Every method on the RTE slice, with its heads report, through the command (one child process per run)."""
    output = tmp_path_factory.mktemp("finetune")
    assert cli.main([*SMOKE, "--report-heads", "--output", str(output)]) == 0
    return output


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> a tiny model folder: bert, gpt2, and bert without its tokenizer files or its weights."""
    root = tmp_path_factory.mktemp("models")
    return {"bert": tiny_model(root / "bert"), "gpt2": tiny_model(root / "gpt2", "gpt2"),
            "notok": tiny_model(root / "notok", tokenizer=False), "noweights": tiny_model(root / "noweights",
                                                                                          weights=False)}
