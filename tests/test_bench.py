"""The shared benchmark helpers: shapes, the copy-bandwidth baseline and the aligned tables."""
import math

import pytest
import torch

from childopt import bench


def test_roberta_base_shapes_have_125m_parameters():
    numel = sum(math.prod(s) for s in bench.roberta_base_shapes())
    assert 124e6 < numel < 126e6


def test_decoder_shapes_have_1_26b_parameters():
    assert 1.25e9 < sum(math.prod(s) for s in bench.decoder_1b_shapes()) < 1.27e9


def test_compare_divides_by_torch_fused_and_the_copy_bandwidth():
    params = bench.make_params([(64,)], torch.device("cpu"))
    rows = [bench.measure_row(spec, spec.make(params, "reference"), params, torch.device("cpu"), warmup=1, steps=1)
            for spec in bench.ROWS if spec.key in ("adamw-fused", "masked-none")]
    compared, baseline = bench.compare(rows, copy_gbps=2 * rows[1].gbps)
    assert baseline == "torch-fused"
    assert compared[0].x_fused == 1.0 and compared[1].x_fused == rows[1].it_s / rows[0].it_s
    assert compared[1].pct_copy_bw == pytest.approx(50.0)


def test_aligned_table_right_aligns_the_numeric_columns():
    table = bench.aligned_table((("name", lambda r: r[0]), ("value", lambda r: r[1])), [("a", "1"), ("bbb", "22")],
                                numeric=(1,))
    assert table.splitlines() == ["name  value", "----  -----", "a         1", "bbb      22"]
