"""The optimizer-step rows are compared with torch fused AdamW and the copy bandwidth."""
import pytest
import torch

from childopt.bench import shapes, step


def test_compare_divides_by_torch_fused_and_the_copy_bandwidth():
    params = shapes.make_params([(64,)], torch.device("cpu"))
    rows = [step.measure_row(spec, spec.make(params, "reference"), params, torch.device("cpu"), warmup=1, steps=1)
            for spec in step.ROWS if spec.key in ("adamw-fused", "masked-none")]
    compared, baseline = step.compare(rows, copy_gbps=2 * rows[1].gbps)
    assert baseline == "torch-fused"
    assert compared[0].x_fused == 1.0 and compared[1].x_fused == rows[1].it_s / rows[0].it_s
    assert compared[1].pct_copy_bw == pytest.approx(50.0)
