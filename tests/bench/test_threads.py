"""Thread counts of the CPU step tables: parsing ``--threads``, naming them, and switching to
each and back, also across a whole run of tables."""
import pytest
import torch

from childopt.bench import step, sweep, threads
from childopt.bench.llc import CacheSize
from tests.bench.helpers import fake_stream


def test_parse_threads_reads_counts_and_all_in_order_each_once():
    assert threads.parse_threads("1,all", 2) == [1, 2]
    assert threads.parse_threads("all, 1, 2, 3", 2) == [2, 1, 3]
    assert threads.parse_threads("1,all", 1) == [1]


@pytest.mark.parametrize("bad", ["0", "two", "1,,2", "-1"])
def test_parse_threads_names_the_bad_item(bad):
    with pytest.raises(ValueError, match="positive integers or 'all'"):
        threads.parse_threads(bad, 2)


def test_labels_say_the_count_and_which_is_all():
    assert threads.label(1, 2) == "1 thread"
    assert threads.label(2, 2) == "2 threads (all)"
    assert threads.label(3, 2) == "3 threads"


def test_intra_op_threads_sets_the_count_and_restores_it_even_on_error():
    start = torch.get_num_threads()
    other = 1 if start != 1 else 2
    with threads.intra_op_threads(other) as count:
        assert count == other and torch.get_num_threads() == other
    assert torch.get_num_threads() == start
    with pytest.raises(RuntimeError, match="boom"), threads.intra_op_threads(other):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == start


def test_run_tables_times_each_count_with_its_own_stream_and_restores_the_count(monkeypatch):
    """Stream and rows of a table both run at its thread count; the stream is shared by the dtypes
    of one count; the count in force before comes back."""
    start = torch.get_num_threads()
    seen = []

    def fake_measure_stream(device, **kwargs):
        seen.append(("stream", torch.get_num_threads()))
        return fake_stream(10.0 * torch.get_num_threads(), torch.get_num_threads())

    def fake_run_table(size, dtype, stream, device, **kwargs):
        seen.append((step.dtype_name(dtype), torch.get_num_threads()))
        return step.Table(size, step.dtype_name(dtype), torch.get_num_threads(), stream, [], [], "torch-fused")

    monkeypatch.setattr(sweep, "measure_stream", fake_measure_stream)
    monkeypatch.setattr(sweep, "last_level_cache", lambda device: CacheSize(2**20, "made up"))
    monkeypatch.setattr(step, "run_table", fake_run_table)
    tables = sweep.run_tables(["24m"], ["float32", "bfloat16"], [1, 3], torch.device("cpu"), warmup=1, steps=1)
    assert torch.get_num_threads() == start
    assert seen == [("stream", 1), ("float32", 1), ("bfloat16", 1), ("stream", 3), ("float32", 3), ("bfloat16", 3)]
    assert [(t.dtype, t.threads, t.stream.gbps) for t in tables] == [("float32", 1, 10.0), ("bfloat16", 1, 10.0),
                                                                     ("float32", 3, 30.0), ("bfloat16", 3, 30.0)]


@pytest.mark.parametrize("bad", ["\u00b2", "\u0661"])
def test_parse_threads_refuses_non_ascii_digits(bad):
    """str.isdigit() accepts "²" (int() then fails with an unclear message) and "١" (silently 1)."""
    with pytest.raises(ValueError, match="positive integers or 'all'"):
        threads.parse_threads(bad, 2)


def test_parse_threads_refuses_counts_past_eight_per_cpu():
    """99999 threads crash torch's pool at its first parallel op; the parser says so first."""
    assert threads.parse_threads(str(threads.max_threads()), 2) == [threads.max_threads()]
    with pytest.raises(ValueError, match=f"more than {threads.max_threads()}"):
        threads.parse_threads("99999", 2)
