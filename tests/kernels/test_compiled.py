"""The Triton kernels compiled for real GPU targets (no GPU needed): it must compile, move its
full blocks with 128-bit loads and stores, and not spill on sm_90; the dense-mask step needs no
layout conversion and the histogram no fence per atomic.  The interpreter cannot show any of this.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"
VARIANTS = [("float32", 0, False, False), ("float32", 1, False, False), ("float32", 1, True, True),
            ("bfloat16", 2, False, False), ("float32", 3, False, False), ("float32", 3, True, True)]
SPARSE_VARIANTS = [("float32", True, False), ("bfloat16", False, True)]


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton")
    script = (f"import json, sys; sys.path.insert(0, {str(TOOLS)!r}); "
              "from triton_resources import compile_variant, compile_sparse_variant as sparse, "
              "compile_histogram_variant as hist, compile_fisher_variant as fisher; "
              "from childopt.kernels.radix_histogram import DEFAULT_ITERS; "
              f"print(json.dumps([compile_variant(arch, *v, 1024, 4) for arch in (80, 90) for v in {VARIANTS!r}]"
              f" + [sparse(arch, *v, 1024, 4) for arch in (80, 90) for v in {SPARSE_VARIANTS!r}]"
              " + [hist(arch, 11, check, 1024, DEFAULT_ITERS) for arch in (80, 90) for check in (False, True)]"
              " + [fisher(arch, dtype, 1024, 4) for arch in (80, 90) for dtype in ('float32', 'bfloat16')]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kernel_compiles_for_sm80_and_does_not_spill_on_sm90(compiled):
    """sm_90 (H100/H200) is the tuned target; on sm_80 the bf16 Bernoulli variant spills ~12 B."""
    assert {r["arch"] for r in compiled} == {80, 90}
    for r in compiled:
        if r["arch"] == 90:
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r


def vectors_of_128_bits(r, *itemsizes):
    """How many 128-bit accesses the compiled kernel ``r`` needs for streams of these element
    sizes: each of its 32 * num_warps threads holds block / threads elements of every stream per
    iteration.  64-bit vectors would take twice as many; scalar accesses are not counted."""
    per_thread = r["block"] // (32 * r["num_warps"])
    return r["iters"] * sum(per_thread * size // 16 for size in itemsizes)


def test_full_blocks_use_128_bit_vectors(compiled):
    """g and p (param dtype), m, v and vmax (fp32) move in 128-bit vectors; all but g are written
    back.  A dense mask's 8 bytes per thread are below one 128-bit access and not counted."""
    for r in (r for r in compiled if r["kernel"] == "masked_adamw"):
        p = 4 if r["param_dtype"] == "float32" else 2
        state = (4, 4, 4) if r["amsgrad"] else (4, 4)
        assert r["vector_loads"] == vectors_of_128_bits(r, p, p, *state), r
        assert r["vector_stores"] == vectors_of_128_bits(r, p, *state), r


def test_sparse_kernel_vectorises_its_compact_streams(compiled):
    """idx (int32), m and v, vmax and a compact g move in 128-bit vectors; p is gathered and scattered."""
    for r in (r for r in compiled if r["kernel"] == "sparse_adamw"):
        g = (4 if r["param_dtype"] == "float32" else 2,) if r["compact_grads"] else ()
        state = (4, 4, 4) if r["amsgrad"] else (4, 4)
        assert r["vector_loads"] == vectors_of_128_bits(r, 4, *g, *state), r
        assert r["vector_stores"] == vectors_of_128_bits(r, *state), r


def test_byte_masks_load_in_words_without_layout_conversions(compiled):
    """Full blocks load the uint8 mask (dense) or level codes (importance) unpredicated, 4 bytes per
    32-bit load (the unmasked kernel plus exactly those loads), in the fp32 streams' layout: no
    conversion through shared memory, which shows as bar.sync (an 8-byte mask load cost 46 of them
    in the PTX and 24 registers).  The importance kernel computes each level's threshold and scale
    from the code in registers (childopt.importance): no further loads."""
    plain = {(r["arch"], r["amsgrad"]): r for r in compiled
             if r["kernel"] == "masked_adamw" and r["mask_kind"] == 0 and r["param_dtype"] == "float32"}
    dense = [r for r in compiled if r["kernel"] == "masked_adamw" and r["mask_kind"] in (1, 3)]
    assert {r["mask_kind"] for r in dense} == {1, 3}
    for r in dense:
        assert r["bar_sync"] == 0, r
        if (r["arch"], r["amsgrad"]) in plain:
            base = plain[r["arch"], r["amsgrad"]]
            words = r["iters"] * r["block"] // (32 * r["num_warps"]) // 4
            assert r["load_bits"]["32"] - base["load_bits"]["32"] == words, (r, base)
            assert r["registers"] <= base["registers"] + 4, (r, base)


def test_histogram_kernel_vectorises_its_score_loads_and_does_not_spill(compiled):
    """A chunk's full blocks are the first block's loads, then a runtime loop that loads the next
    block while counting the current one: two blocks' 128-bit loads in the code, whatever iters."""
    for r in (r for r in compiled if r["kernel"] == "radix_histogram"):
        assert r["vector_loads"] == vectors_of_128_bits(dict(r, iters=2), 4) and r["spill_stores"] == 0, r


def test_histogram_flushes_non_zero_bins_with_relaxed_atomics(compiled):
    """Counts need no ordering (the host reads them after the launch).  Triton's default acq_rel
    atomic puts a GPU-wide fence (MEMBAR) before, and a cache invalidation after, each of the 16
    per-thread adds of a 2048-bin flush; relaxed ones compile to plain reductions (RED)."""
    for r in (r for r in compiled if r["kernel"] == "radix_histogram"):
        assert r["atomics"] == 2**r["bits"] // (32 * r["num_warps"]) == r["sass_atomics"], r
        assert r["ordered_atomics"] == r["ptx_fences"] == r["sass_membar"] == 0, r


def test_fisher_kernel_vectorises_and_does_not_spill(compiled):
    """fisher (fp32) is read and written, the gradient (its own dtype) read, in 128-bit vectors."""
    for r in (r for r in compiled if r["kernel"] == "fisher_accumulate"):
        g = 4 if r["grad_dtype"] == "float32" else 2
        assert r["vector_loads"] == vectors_of_128_bits(r, 4, g), r
        assert r["vector_stores"] == vectors_of_128_bits(r, 4) and r["spill_stores"] == 0, r
