"""The native CPU kernels run on every intra-op thread (torch.get_num_threads()), and their
results do not depend on the thread count.

childopt._C records which threads ran chunks of an op when a test switches recording on, so
these tests count threads instead of timing anything.  If the extension were built without
OpenMP (at::parallel_for then runs serially) or linked to a second OpenMP runtime that
torch.set_num_threads does not size, the counts would differ.
"""
import sys

import pytest
import torch

from childopt import MaskedAdamW
from tests.helpers import assert_all_equal, make_params, masks_for, snapshot, train

SHAPES = [(64 * 1024,)] * 6 + [(1031,), (3, 5)]  # 14 chunks of 32K elements and two tiny tensors
MASKS = ["none", "dense", "bernoulli", "sparse"]


def _optimizer(params, mask):
    kwargs = dict(lr=1e-2, weight_decay=0.1, seed=5, backend="native")
    if mask == "bernoulli":
        return MaskedAdamW(params, mask="bernoulli", reserve_p=0.3, **kwargs)
    if mask in ("dense", "sparse"):
        return MaskedAdamW(params, mask=masks_for(params), storage="sparse" if mask == "sparse" else "dense", **kwargs)
    return MaskedAdamW(params, **kwargs)


def _recorded(native_module, run) -> tuple:
    """``run()`` with the recorder on: how many threads ran chunks, and the work items of each."""
    native_module._record_chunk_threads(True)
    try:
        run()
        return native_module._chunk_thread_count(), native_module._chunk_thread_items()
    finally:
        native_module._record_chunk_threads(False)


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("count", [1, 2, 3])
def test_a_step_runs_its_chunks_on_every_intra_op_thread(native_module, threads, mask, count):
    threads(count)
    params = make_params(SHAPES if mask != "sparse" else [(256 * 1024,)] * 6)
    opt = _optimizer(params, mask)
    train(opt, params, 1)  # state exists; the recorded step is a plain one
    used, _ = _recorded(native_module, lambda: train(opt, params, 1, start=1))
    assert used == count


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("count", [2, 3])
def test_the_threads_share_a_steps_elements_evenly_not_its_chunks(native_module, threads, mask, count):
    """One large tensor (its full 32K-element chunks) listed before many small ones (a chunk of a
    few elements each), as an embedding before biases and norms: split by chunk count, one thread
    would get the large tensor and the others the small ones.  Each share is within one chunk of
    an equal share (at::parallel_for rounds the equal share up: ``count`` elements of slack)."""
    threads(count)
    params = make_params([(640 * 1024,)] + [(64,)] * 40)
    opt = _optimizer(params, mask)
    train(opt, params, 1)
    _, items = _recorded(native_module, lambda: train(opt, params, 1, start=1))
    stepped = sum(opt.state[p]["indices"].numel() if mask == "sparse" else p.numel() for p in params)
    assert len(items) == count and sum(items) == stepped
    assert max(abs(share - stepped / count) for share in items) <= 32 * 1024 + count


def test_recording_is_off_unless_asked(native_module):
    native_module._record_chunk_threads(False)
    params = make_params(SHAPES)
    train(_optimizer(params, "none"), params, 1)
    assert native_module._chunk_thread_count() == 0


@pytest.mark.parametrize("mask", MASKS)
def test_results_are_bit_identical_at_1_2_and_3_threads(native_module, threads, mask):
    results = []
    for count in (1, 2, 3):
        threads(count)
        params = make_params(SHAPES)
        opt = _optimizer(params, mask)
        train(opt, params, 3)
        results.append(snapshot(opt, params))
    assert_all_equal(results[0], results[1])
    assert_all_equal(results[0], results[2])


def test_the_build_uses_torchs_openmp_runtime_when_aten_does():
    """-fopenmp is in the build flags exactly when ATen's parallel backend is OpenMP (on Linux), and
    a torch that ships libgomp (its pip wheels) is linked with -fopenmp: the same soname, so one runtime."""
    from childopt._native import config

    openmp = config.torch_openmp(torch)
    uses_openmp = "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()
    assert ("-fopenmp" in config.cxx_flags(False, openmp)) == (uses_openmp and sys.platform.startswith("linux"))
    if openmp == "gomp":
        assert config.ld_flags(openmp) == ["-fopenmp"]
    assert config.ld_flags(None) == [] and "-fopenmp" not in config.cxx_flags(True, None)


@pytest.mark.parametrize("count", [1, 2, 3])
def test_the_host_helpers_and_the_stream_reference_run_on_every_intra_op_thread(native_module, threads, count):
    threads(count)
    for run in (lambda: native_module._philox_words(torch.empty(1 << 20, dtype=torch.int32), 0, 1, 2),
                lambda: native_module._level_codes(torch.rand(1 << 20), torch.zeros(1 << 20).byte(), 0, 1, 2),
                lambda: native_module._probability_sums(-torch.rand(1 << 20), 0.0, 1.0, 0.1),
                lambda: native_module._keep_probabilities(-torch.rand(1 << 20), torch.empty(1 << 20), 0.0, 1.0, 0.1),
                lambda: native_module._portable_log2(torch.rand(1 << 20), torch.empty(1 << 20)),
                lambda: native_module._inplace_stream(*(torch.zeros(1 << 20) for _ in range(4)))):
        used, _ = _recorded(native_module, run)
        assert used == count
