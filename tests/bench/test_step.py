"""The optimizer-step rows: the byte model they are charged, and their comparison with torch fused
AdamW and the copy bandwidth, on made-up timings with the ratios worked out by hand."""
import pytest
import torch

from childopt.bench import shapes, step
from tests.bench.helpers import BYTES_PER_ELEMENT, fake_row

SPECS = {spec.key: spec for spec in step.ROWS}


def test_compare_divides_by_torch_fused_and_the_copy_bandwidth():
    """At 40 GB/s copy bandwidth and fused at 80 it/s: 50 it/s is 0.625x, 100 it/s 1.25x; 10 GB/s is 25%."""
    rows = [fake_row("adamw-foreach", "torch AdamW", "foreach", 50.0, 10.0),
            fake_row("adamw-fused", "torch AdamW", "fused", 80.0, 16.0),
            fake_row("masked-none", "MaskedAdamW", "mask=None", 100.0, 20.0)]
    compared, baseline = step.compare(rows, copy_gbps=40.0)
    assert baseline == "torch-fused"
    assert [r.x_fused for r in compared] == [0.625, 1.0, 1.25]
    assert [r.pct_copy_bw for r in compared] == [25.0, 40.0, 50.0]


def test_compare_falls_back_to_foreach_without_a_fused_row():
    rows = [fake_row("adamw-foreach", "torch AdamW", "foreach", 50.0, 10.0),
            fake_row("masked-none", "MaskedAdamW", "mask=None", 100.0, 20.0)]
    compared, baseline = step.compare(rows, copy_gbps=40.0)
    assert baseline == "torch-foreach" and [r.x_fused for r in compared] == [1.0, 2.0]


def test_table_prints_each_row_s_share_and_speed_ratio():
    compared, baseline = step.compare([fake_row("adamw-fused", "torch AdamW", "fused", 80.0, 16.0),
                                       fake_row("masked-none", "MaskedAdamW", "mask=None", 100.0, 20.0)], 40.0)
    table = step.format_table(compared, baseline).splitlines()
    assert table[0].split()[-3:] == ["BW", "x", "torch-fused"]
    assert table[2].split() == ["torch", "AdamW", "fused", "b", "80.00", "12.50", "1.000", "0.500", "16.0", "40%",
                                "1.00x"]
    assert table[3].split() == ["MaskedAdamW", "mask=None", "b", "100.00", "10.00", "1.000", "0.500", "20.0", "50%",
                                "1.25x"]


@pytest.mark.parametrize("key", BYTES_PER_ELEMENT)
def test_measure_row_charges_the_byte_model_and_steps_the_optimizer(key):
    """bytes_per_step is the row's bytes per element times the elements; GB/s is those bytes per second."""
    params = shapes.make_params([(1000,)], torch.device("cpu"))
    before = params[0].detach().clone()
    row = step.measure_row(SPECS[key], SPECS[key].make(params, "reference"), params, torch.device("cpu"),
                           warmup=1, steps=2)
    assert (row.key, row.numel, row.steps, row.bytes_per_step) == (key, 1000, 2, round(1000 * BYTES_PER_ELEMENT[key]))
    assert row.gbps == pytest.approx(row.bytes_per_step * row.it_s / 1e9)
    assert row.ms_per_step == pytest.approx(1e3 / row.it_s)
    assert not torch.equal(params[0].detach(), before)
