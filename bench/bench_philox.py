"""pytest-benchmark suite: the CPU Philox draw alone, per ISA, on one thread.

The Bernoulli and importance steps draw before they update, so the draw's cost per element is
what bounds them where it is compute-bound (AVX2 machines).  Each case draws 64K elements (256 KiB
of words, within any L2) with the ISA forced, so the figure is the arithmetic, not memory:
``python -m pytest bench/bench_philox.py --benchmark-enable`` gives ns per element as the mean
divided by 65536.  With benchmarks disabled (CI) each case runs once and checks its output against
childopt.philox / childopt.importance.
"""
import pytest
import torch

from childopt import importance, philox

ISAS = {"scalar": 0, "avx2": 1, "avx512": 2}
ELEMENTS = 1 << 16
RNG_BASE, SEED, STEP = 3, 1234, 5


@pytest.fixture
def one_thread_isa(request):
    """The native module on one thread with ``request.param``'s ISA (skipped where this CPU lacks it)."""
    from childopt import _native

    try:
        module = _native.load()
    except Exception as exc:  # noqa: BLE001 (any build failure means there is nothing to time)
        pytest.skip(f"the native extension is unavailable: {exc}")
    threads, isa = torch.get_num_threads(), module._philox_isa()
    try:
        module._set_philox_isa(ISAS[request.param])
    except RuntimeError:
        pytest.skip(f"this CPU cannot run {request.param}")
    torch.set_num_threads(1)
    yield module
    torch.set_num_threads(threads)
    module._set_philox_isa(isa)


@pytest.mark.parametrize("one_thread_isa", list(ISAS), indirect=True)
def bench_philox_words(benchmark, one_thread_isa):
    words = torch.empty(ELEMENTS, dtype=torch.int32)
    benchmark(one_thread_isa._philox_words, words, RNG_BASE, SEED, STEP)
    expected = philox.random_words(ELEMENTS, RNG_BASE, SEED, STEP, "cpu")
    assert torch.equal(words.to(torch.int64) & philox.MASK32, expected)


@pytest.mark.parametrize("one_thread_isa", list(ISAS), indirect=True)
def bench_importance_draw(benchmark, one_thread_isa):
    codes = torch.randint(0, 256, (ELEMENTS,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    keep, _ = benchmark(one_thread_isa._importance_draw, codes, RNG_BASE, SEED, STEP)
    words = philox.random_words(ELEMENTS, RNG_BASE, SEED, STEP, "cpu")
    assert torch.equal(keep, words < importance.level_thresholds(codes))
