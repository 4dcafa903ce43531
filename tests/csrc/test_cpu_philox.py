"""The vectorised Philox of the CPU kernels (csrc/cpu/philox_cpu.h) draws exactly childopt.philox's
stream with every ISA this CPU has (AVX-512 with BW and BMI2, AVX2, scalar code) and at every
thread count: the raw words behind sample_mask's Gumbel noise, the Bernoulli masks of a native
step and the importance masks' level compare, checked against the plain-torch definition and the
reference backend.
"""
import platform

import pytest
import torch

from childopt import Importance, MaskedAdamW, importance, masks, philox
from tests.csrc.conftest import ISAS
from tests.helpers import assert_all_equal, bernoulli_keep_at, make_params, snapshot, train

THREADS = (1, 2, 3)
# (numel, rng_base, seed, step): a lone element, a partial group at the top of the counter's low
# word, a vector step that carries into the high word, long runs split over the threads.
WORD_CASES = [
    (1, 0, 0, 0),
    (7, 2**32 - 1, 2**64 - 1, 2**32 + 5),
    (4 * 32 * 3 + 7, 2**32 - 40, 12345, 7),
    (100_003, 2**40 + 1, 99, 2**63),
    (300_001, 5, 2**33 + 1, 1),
]
SHAPES = [(1,), (3,), (5,), (129,), (1031,), (64 * 1024 + 5,), (7, 13)]


def _cpu_flags() -> set:
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())


def test_the_default_is_the_fastest_isa_this_cpu_has(native_module):
    assert native_module._philox_isa() == native_module._best_philox_isa()
    if platform.machine() in ("x86_64", "AMD64") and _cpu_flags():
        flags = _cpu_flags()
        avx512 = {"avx512f", "avx512bw", "bmi2"} <= flags
        expected = "avx512" if avx512 else "avx2" if "avx2" in flags else "scalar"
        assert native_module._best_philox_isa() == ISAS[expected]


def test_an_unknown_isa_is_refused(native_module):
    with pytest.raises(RuntimeError, match="unknown Philox ISA 7"):
        native_module._set_philox_isa(7)
    assert native_module._philox_isa() == native_module._best_philox_isa()


@pytest.mark.parametrize("count", THREADS)
@pytest.mark.parametrize("numel, rng_base, seed, step", WORD_CASES)
def test_words_equal_the_definition(native_module, isa, threads, count, numel, rng_base, seed, step):
    threads(count)
    words = torch.empty(numel, dtype=torch.int32)
    native_module._philox_words(words, rng_base, seed, step)
    expected = philox.random_words(numel, rng_base, seed, step, "cpu")
    assert torch.equal(words.to(torch.int64) & philox.MASK32, expected)


def test_words_need_a_contiguous_int32_cpu_tensor(native_module):
    with pytest.raises(RuntimeError, match="words must be a contiguous int32 CPU tensor"):
        native_module._philox_words(torch.empty(8, dtype=torch.int64), 0, 0, 0)
    with pytest.raises(RuntimeError, match="words must be a contiguous int32 CPU tensor"):
        native_module._philox_words(torch.empty(8, 2, dtype=torch.int32).t(), 0, 0, 0)


@pytest.mark.parametrize("count", THREADS)
def test_bernoulli_masks_equal_the_definition(native_module, isa, threads, count):
    """Under freeze exactly the kept entries move, step after step: the masks drawn 32 groups per
    vector (a partial vector and a partial group at every tensor's end) are childopt.philox's."""
    threads(count)
    params = make_params(SHAPES)
    seed = 2**63 + 11
    keep_at = bernoulli_keep_at(params, seed, 0.3)
    opt = MaskedAdamW(params, mask="bernoulli", reserve_p=0.3, masked="freeze", seed=seed, lr=1e-2,
                      backend="native")
    for t in range(1, 4):
        before = [p.detach().clone() for p in params]
        train(opt, params, 1, start=t - 1)
        for i, (p, old) in enumerate(zip(params, before)):
            assert torch.equal(p.detach() != old, keep_at(i, t)), (i, t)


@pytest.mark.parametrize("masked", ["freeze", "zero_grad"])
@pytest.mark.parametrize("mask, dtype", [("bernoulli", torch.float32), ("importance", torch.float32),
                                         ("importance", torch.bfloat16)])
def test_masked_steps_are_bit_identical_on_every_isa_and_thread_count(native_module, threads, mask, dtype, masked):
    """Bernoulli, and importance masks (running scores redrawn every other step, so the level codes
    change within the run; AVX-512 and AVX2 compare them in registers, scalar code through words in memory)."""
    def run(isa, count):
        native_module._set_philox_isa(isa)
        threads(count)
        params = make_params(SHAPES, dtype=dtype)
        opt = MaskedAdamW(params, mask=Importance(refresh_every=2) if mask == "importance" else mask,
                          reserve_p=0.3, masked=masked, seed=7, lr=1e-2, weight_decay=0.1, backend="native")
        train(opt, params, 4)
        return snapshot(opt, params, ("exp_avg", "exp_avg_sq", "importance"))

    best = native_module._best_philox_isa()
    try:
        baseline = run(ISAS["scalar"], 1)
        for isa in range(ISAS["scalar"], best + 1):
            for count in THREADS:
                assert_all_equal(run(isa, count), baseline)
    finally:
        native_module._set_philox_isa(best)


def test_importance_levels_equal_the_definition(native_module, isa):
    """Every level code against words at and around its threshold, the extremes and random words:
    keep is ``word < threshold`` of childopt.importance (code 255 always, code 0 never), and the
    scale is level_scales' fp32 bits.  1543 words: 96 vectors of 16 and a tail of 7."""
    codes = torch.arange(256, dtype=torch.uint8)
    threshold = importance.level_thresholds(codes)
    near = torch.stack([threshold - 1, threshold, threshold + 1, torch.zeros_like(threshold),
                        torch.full_like(threshold, philox.MASK32), torch.randint(0, 2**32, (256,))], 1)
    words = torch.cat([near.clamp(0, philox.MASK32).reshape(-1), torch.randint(0, 2**32, (7,))])
    codes = torch.cat([codes.repeat_interleave(near.shape[1]), torch.randint(0, 256, (7,), dtype=torch.uint8)])
    keep, scales = native_module._importance_levels((words - (words >> 31 << 32)).to(torch.int32), codes)
    assert torch.equal(keep, words < importance.level_thresholds(codes))
    used = codes != 0  # code 0 is never kept: its scale is never read (the reference gives inf)
    assert torch.equal(scales[used].view(torch.int32), importance.level_scales(codes)[used].view(torch.int32))


@pytest.mark.parametrize("numel, rng_base, seed, step", WORD_CASES)
def test_importance_draws_equal_the_definition(native_module, isa, numel, rng_base, seed, step):
    """A whole run of codes in one draw (register steps of 128 or 32, pieces of 256, a partial last
    group): keep is ``word < threshold`` of childopt.philox's words, code 255 always, 0 never."""
    codes = torch.randint(0, 256, (numel,), generator=torch.Generator().manual_seed(numel), dtype=torch.uint8)
    codes[:3] = torch.tensor([0, 255, 128], dtype=torch.uint8)[:numel]
    keep, scales = native_module._importance_draw(codes, rng_base, seed, step)
    words = philox.random_words(numel, rng_base, seed, step, "cpu")
    assert torch.equal(keep, words < importance.level_thresholds(codes))
    used = codes != 0
    assert torch.equal(scales[used].view(torch.int32), importance.level_scales(codes)[used].view(torch.int32))


def test_importance_levels_need_int32_words_and_uint8_codes_of_one_shape(native_module):
    with pytest.raises(RuntimeError, match="words must be a contiguous 1-D int32 CPU tensor"):
        native_module._importance_levels(torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="codes must be a contiguous uint8 CPU tensor of the words' shape"):
        native_module._importance_levels(torch.zeros(4, dtype=torch.int32), torch.zeros(5, dtype=torch.uint8))


def test_sample_mask_draws_the_same_gumbel_noise_natively(native_module, isa):
    """sample_mask on CPU takes its words from the native kernel; the masks equal the reference's."""
    torch.manual_seed(0)
    scores = {f"w{i}": torch.rand(shape) for i, shape in enumerate(SHAPES)}
    native = masks.sample_mask(scores, 0.3, temperature=0.7, seed=21, backend="native")
    reference = masks.sample_mask(scores, 0.3, temperature=0.7, seed=21, backend="reference")
    assert native.keys() == reference.keys()
    for name in native:
        assert torch.equal(native[name], reference[name]), name
