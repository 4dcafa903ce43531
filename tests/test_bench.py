"""``python -m childopt bench`` end to end (one timed step per row), so the main job cannot rot."""
import json

from childopt import bench


def test_quick_bench_writes_every_row_with_speed_and_memory(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--steps", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    keys = {(spec.optimizer, spec.mode) for spec in bench.ROWS}
    measured = {(row["optimizer"], row["mode"]) for row in report["rows"]}
    skipped = {(row["optimizer"], row["mode"]) for row in report["skipped"]}
    assert measured | skipped == keys
    for row in report["rows"]:
        assert row["it_s"] > 0 and row["peak_gb"] > 0 and row["gbps"] > 0
        spec = next(spec for spec in bench.ROWS if (spec.optimizer, spec.mode) == (row["optimizer"], row["mode"]))
        assert row["bytes_per_step"] == round(row["numel"] * spec.bytes_per_element)
    assert report["meta"]["torch"] and report["copy_gbps"] > 0
    table = capsys.readouterr().out
    assert "x torch-" in table and "MaskedAdamW" in table


def test_roberta_base_shapes_have_125m_parameters():
    numel = sum(int(__import__("math").prod(s)) for s in bench.roberta_base_shapes())
    assert 124e6 < numel < 126e6
