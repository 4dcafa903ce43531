"""childopt.portable_math against a float64 oracle (torch's float64 exp2 and log2, rounded once more
than the exact value: far below the fp32 tolerance), its special values by hand, and the property it
exists for: an element's bits do not depend on where it sits or on the thread count (torch's CPU
exp2 gives the last elements of each thread's chunk libm's result instead of Sleef's)."""
import math

import pytest
import torch

from childopt import portable_math


def ulp_error(result: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|result - exact| in fp32 ulps of the exact value (the subnormal ulp below 2**-126)."""
    exponent = torch.frexp(exact.abs().clamp_min(2.0**-149))[1].double()
    return (result.double() - exact).abs() / torch.pow(2.0, (exponent - 24).clamp_min(-149))


def random_floats(count: int, seed: int) -> torch.Tensor:
    bits = torch.randint(-2**31, 2**31 - 1, (count,), generator=torch.Generator().manual_seed(seed))
    return bits.int().view(torch.float32)


def test_exp2_is_within_1_5_ulp_of_the_exact_value():
    gen = torch.Generator().manual_seed(0)
    x = random_floats(1 << 20, 1)
    y = torch.cat([x[x.isfinite() & (x.abs() <= 200)], torch.rand(1 << 20, generator=gen) * 400 - 200,
                   torch.rand(1 << 18, generator=gen) - 0.5, torch.rand(1 << 16, generator=gen) * 30 - 150])
    exact = torch.exp2(y.double())
    finite = exact < 2.0**128 * (1 - 2.0**-25)  # below fp32's overflow threshold
    assert float(ulp_error(portable_math.exp2(y)[finite], exact[finite]).max()) <= 1.5
    assert bool(portable_math.exp2(y[~finite]).isinf().all())


def test_log2_is_within_3_5_ulp_and_1_5e_7_of_the_exact_value():
    gen = torch.Generator().manual_seed(0)
    x = random_floats(1 << 20, 2)
    x = torch.cat([x[x.isfinite() & (x > 0)], torch.rand(1 << 20, generator=gen) + 0.5,
                   torch.rand(1 << 16, generator=gen) * 2.0**-126])
    result, exact = portable_math.log2(x), torch.log2(x.double())
    assert float(ulp_error(result, exact).max()) <= 3.5
    near_one = (x > 0.5) & (x < 1.5)  # where the ulp of log2 x is finest: absolute error
    assert float((result[near_one].double() - exact[near_one]).abs().max()) <= 1.5e-7


def test_special_values_by_hand():
    inf, nan = math.inf, math.nan
    assert portable_math.exp2(torch.tensor([-inf, inf, 200.0, 128.0, 0.0, 1.0, -1.0])).tolist() == \
        [0.0, inf, inf, inf, 1.0, 2.0, 0.5]
    assert math.isnan(portable_math.exp2(torch.tensor([nan])).item())
    k = torch.arange(-149, 128)
    assert torch.equal(portable_math.exp2(k.float()), torch.ldexp(torch.ones(k.numel()), k))  # exact powers of two
    assert portable_math.exp2(torch.tensor([-150.0, -151.0, -149.4])).tolist() == [0.0, 0.0, 2.0**-149]
    assert torch.equal(portable_math.log2(torch.ldexp(torch.ones(k.numel()), k)), k.float())  # subnormals too
    logs = portable_math.log2(torch.tensor([0.0, -0.0, inf, -1.0, nan, -inf]))
    assert logs[:3].tolist() == [-inf, -inf, inf] and bool(logs[3:].isnan().all())
    wide = portable_math.log2(torch.tensor([2.0**-1074, 1e-300, 1e300, 0.0], dtype=torch.float64))
    assert wide.dtype == torch.float64 and wide[0] == -1074 and wide[3] == -inf
    assert wide[1:3].tolist() == pytest.approx([math.log2(1e-300), math.log2(1e300)], abs=1e-7)


@pytest.mark.parametrize("function, low, high", [(portable_math.exp2, -20.0, 0.0), (portable_math.log2, 0.0, 1e-3)])
def test_an_elements_bits_do_not_depend_on_its_position_or_the_thread_count(function, low, high):
    x = torch.rand((1 << 20) + 7, generator=torch.Generator().manual_seed(5)) * (high - low) + low
    before = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):  # 3 threads cut the tensor off the 32-element vector steps
            torch.set_num_threads(count)
            results.append(function(x))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    # the first 2015 elements again, 31 at a time: torch's CPU exp2 takes libm's scalar path for all
    # of them and differs from its vector results on about 1 in 16 of these inputs (fails here)
    alone = torch.cat([function(x[start:start + 31].clone()) for start in range(0, 31 * 65, 31)])
    assert torch.equal(alone, results[0][:31 * 65])


@pytest.mark.cuda
def test_cuda_gives_the_cpu_bits():
    """CUDA's basic operations round as the CPU's do, so the same definition gives the same bits there
    (part of what lets a refresh on a GPU draw the CPU's codes: test_importance checks the whole of it)."""
    x = random_floats(1 << 22, 7)
    y = torch.cat([x[x.isfinite() & (x.abs() <= 200)], torch.rand(1 << 20) * 400 - 200, torch.tensor([-torch.inf])])
    assert torch.equal(portable_math.exp2(y.cuda()).cpu().view(torch.int32), portable_math.exp2(y).view(torch.int32))
    z = torch.cat([x[x >= 0], torch.tensor([0.0, torch.inf])])
    assert torch.equal(portable_math.log2(z.cuda()).cpu().view(torch.int32), portable_math.log2(z).view(torch.int32))
    wide = torch.tensor([2.0**-1074, 1e-300, 3.0, 1e300], dtype=torch.float64)
    assert torch.equal(portable_math.log2(wide.cuda()).cpu(), portable_math.log2(wide))
