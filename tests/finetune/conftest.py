"""The smoke run, once for all the finetune tests that read its JSONs, table and plot."""
import pytest

from childopt.finetune import cli
from tests.finetune.smoke import SMOKE


@pytest.fixture(scope="package")
def smoke(tmp_path_factory):
    """Every method on the RTE slice, with its heads report, through the command (one child process per run)."""
    output = tmp_path_factory.mktemp("finetune")
    assert cli.main([*SMOKE, "--report-heads", "--output", str(output)]) == 0
    return output
