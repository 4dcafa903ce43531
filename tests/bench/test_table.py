"""The aligned text tables every benchmark prints."""
from childopt.bench.table import aligned_table


def test_aligned_table_right_aligns_the_numeric_columns():
    table = aligned_table((("name", lambda r: r[0]), ("value", lambda r: r[1])), [("a", "1"), ("bbb", "22")],
                          numeric=(1,))
    assert table.splitlines() == ["name  value", "----  -----", "a         1", "bbb      22"]
