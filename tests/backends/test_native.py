"""What only the native backend (childopt._C) has to show: bit-identity with Triton, the
Bernoulli stream's high words, argument errors from C++, dtype fallbacks and auto's choice.

Agreement with the reference on every mask kind is in test_kernel_backends.py; the optimizer
tests (tests/test_optim*.py, test_childtuning.py) also run on the native lane.
"""
import itertools

import pytest
import torch

from childopt import backends, philox
from childopt.backends import TensorLists, native, reference
from childopt.backends.contract import COLUMN, MaskKind, MaskSpec, StepScalars
from tests.helpers import kernel_backend, make_params

SHAPES = [(7, 5), (13,), (0,), (1031,), (3, 4, 5), (1,), (4099,)]
RNG_BASES = list(itertools.accumulate([0] + [philox.rng_group_counts(torch.Size(s).numel()) for s in SHAPES]))[:-1]
SEED = 2**40 + 12345


@pytest.fixture
def native_cpu():
    ok, why = native.available(torch.device("cpu"))
    if not ok:
        pytest.skip(why)
    return native.Backend()


def bucket(dtype, amsgrad, kind, seed=0):
    """A bucket of odd-sized tensors with random state, on CPU."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    return TensorLists(
        params=params, grads=[torch.randn(s, generator=gen).to(dtype) for s in SHAPES],
        exp_avgs=[torch.randn(s, generator=gen) * 0.1 for s in SHAPES],
        exp_avg_sqs=[torch.rand(s, generator=gen) for s in SHAPES],
        max_exp_avg_sqs=[torch.rand(s, generator=gen) + 0.5 for s in SHAPES] if amsgrad else None,
        masks={MaskKind.DENSE: [torch.rand(s, generator=gen) < 0.3 for s in SHAPES],
               MaskKind.IMPORTANCE: [torch.randint(0, 256, s, generator=gen, dtype=torch.uint8) for s in SHAPES]
               }.get(kind),
    )


def outputs(t: TensorLists):
    return t.params + t.exp_avgs + t.exp_avg_sqs + (t.max_exp_avg_sqs or [])


def rows(maximize=False, decay_after=False, one_minus_beta1=0.1, grad_scale=1.0, step=3):
    """One row per tensor of SHAPES: the same scalars, each tensor's own Philox base."""
    decay = 1 - 1e-3 * 0.01
    hp = StepScalars(decay_before=1.0 if decay_after else decay, decay_after=decay if decay_after else 1.0,
                     one_minus_beta1=one_minus_beta1, beta2=0.999, one_minus_beta2=0.001, eps=1e-8,
                     step_size=1e-3 / 0.19, bc2_sqrt=0.0447, grad_scale=grad_scale, grad_sign=-1.0 if maximize else 1.0,
                     lerp_from_start=1.0 if one_minus_beta1 < 0.5 else 0.0, step=step, rng_base=0)
    table = hp.rows(len(SHAPES))
    table[:, COLUMN["rng_base"]] = torch.tensor(RNG_BASES, dtype=torch.float64)
    return table


def mask_spec(kind, freeze):
    if kind == MaskKind.BERNOULLI:
        return MaskSpec(kind=kind, freeze=freeze, keep_threshold=philox.keep_threshold(0.3), seed=SEED)
    return MaskSpec(kind=kind, freeze=freeze)


VARIANTS = [(kind, freeze) for kind in MaskKind for freeze in (False, True) if not (kind == MaskKind.NONE and freeze)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,freeze", VARIANTS)
@pytest.mark.parametrize("amsgrad,maximize,decay_after,one_minus_beta1",
                         [(False, False, False, 0.1), (True, True, True, 0.1), (False, False, False, 0.7)],
                         ids=["adamw", "amsgrad-maximize-decay-after", "lerp-from-end"])
def test_native_cpu_is_bit_identical_to_triton(native_cpu, dtype, kind, freeze, amsgrad, maximize, decay_after,
                                               one_minus_beta1):
    """The same fp32 operations in the same order, no contraction, IEEE sqrt and division, the
    same bf16 rounding: native CPU and Triton (interpreted here, compiled on a GPU) agree bit
    for bit, including the lerp branch taken when 1 - beta1 >= 0.5."""
    ok, why = backends.MODULES["triton"].available(torch.device("cpu"))
    if not ok:
        pytest.skip(why)
    scale = 1 / 0.3 if kind == MaskKind.BERNOULLI and not freeze else 1.0
    hp = rows(maximize, decay_after, one_minus_beta1, grad_scale=scale)
    ours, theirs = bucket(dtype, amsgrad, kind), bucket(dtype, amsgrad, kind)
    native_cpu.adamw_step(ours, hp, mask_spec(kind, freeze))
    kernel_backend("triton").adamw_step(theirs, hp, mask_spec(kind, freeze))
    for a, b in zip(outputs(ours), outputs(theirs), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["reference", "triton", "native"])
@pytest.mark.parametrize("step", [1, 2**32 + 5], ids=["step-1", "step-past-2**32"])
def test_bernoulli_mask_equals_the_philox_definition(name, step):
    """Under freeze, exactly the entries the Philox definition keeps move, on every backend.

    The oracle is childopt.philox (checked against Random123's known answers); a step past
    2**32 exercises the counter's high word, a seed past 2**32 the key's.
    """
    ok, why = backends.MODULES[name].available(torch.device("cpu"))
    if not ok:
        pytest.skip(why)
    t = bucket(torch.float32, False, MaskKind.BERNOULLI)
    before = [m.clone() for m in t.exp_avgs]
    kernel_backend(name).adamw_step(t, rows(step=step), mask_spec(MaskKind.BERNOULLI, True))
    for i, (m_old, m_new) in enumerate(zip(before, t.exp_avgs, strict=True)):
        keep = philox.bernoulli_keep(m_old.numel(), RNG_BASES[i], SEED, step, 0.3, "cpu")
        assert torch.equal((m_new != m_old).reshape(-1), keep)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", [MaskKind.DENSE, MaskKind.BERNOULLI])
def test_frozen_16_bit_entries_keep_their_bits_through_the_fp32_scratch(native_cpu, dtype, kind):
    """16-bit params step through fp32 scratch (widen, update, narrow); a frozen entry must come
    back with its own bits, not a round trip's: NaN payloads (which rounding would make the
    canonical NaN), signalling NaNs and -0.0 stay, while kept entries move as the reference moves them."""
    t, want = bucket(dtype, False, kind), bucket(dtype, False, kind)
    odd_bits = torch.tensor([0x7F81, 0xFFFF, 0x7C01, 0xFE01, 0x8000], dtype=torch.int32).to(torch.int16)
    for a, b in zip(t.params, want.params, strict=True):
        every_fifth = a.view(torch.int16).view(-1)[::5][:5]
        every_fifth.copy_(odd_bits[: every_fifth.numel()])
        b.copy_(a)
    before = [p.clone() for p in t.params]
    native_cpu.adamw_step(t, rows(), mask_spec(kind, True))
    reference.Backend().adamw_step(want, rows(), mask_spec(kind, True))
    for i, (old, new, ref) in enumerate(zip(before, t.params, want.params, strict=True)):
        moved = (new.view(torch.int16) != old.view(torch.int16)).reshape(-1)
        if kind == MaskKind.DENSE:
            kept = t.masks[i].reshape(-1)
        else:
            kept = philox.bernoulli_keep(old.numel(), RNG_BASES[i], SEED, 3, 0.3, "cpu")
        assert not moved[~kept].any(), f"tensor {i}: a frozen entry changed bits"
        # a kept NaN stores the canonical NaN here (as Triton), the reference keeps torch's payload
        nan = ref.isnan()
        assert torch.equal(new.isnan(), nan) and torch.equal(new[~nan].view(torch.int16), ref[~nan].view(torch.int16))


def test_argument_errors_name_the_tensor(native_cpu):
    t = bucket(torch.float32, False, MaskKind.NONE)
    t.exp_avgs[1] = torch.zeros(3)
    with pytest.raises(RuntimeError, match=r"exp_avgs\[1\] has 3 elements, expected 13"):
        native_cpu.adamw_step(t, rows(), mask_spec(MaskKind.NONE, False))
    t = bucket(torch.float32, False, MaskKind.DENSE)
    t.masks[0] = t.masks[0].to(torch.uint8)
    with pytest.raises(RuntimeError, match=r"masks\[0\] must be Bool"):
        native_cpu.adamw_step(t, rows(), mask_spec(MaskKind.DENSE, True))
    bad = bucket(torch.bfloat16, False, MaskKind.NONE)
    with pytest.raises(RuntimeError, match=r"grads must have the params' dtype \(BFloat16\) or float32, got Half"):
        torch.ops.childopt.adamw_step(bad.params, [g.half() for g in bad.grads], bad.exp_avgs, bad.exp_avg_sqs, [], [],
                                      rows(), 0, False, False, 1, 0, 0)
    with pytest.raises(RuntimeError, match=r"scalars must be a contiguous float64 tensor of shape \[7, 13\]"):
        torch.ops.childopt.adamw_step(bad.params, bad.grads, bad.exp_avgs, bad.exp_avg_sqs, [], [], rows()[:, :11], 0,
                                      False, False, 1, 0, 0)
    with pytest.raises(RuntimeError, match="mask_kind must be 0 \\(none\\), 1 \\(dense\\), 2 \\(bernoulli\\) or 3 "
                                           "\\(importance\\), got 4"):
        torch.ops.childopt.adamw_step(bad.params, bad.grads, bad.exp_avgs, bad.exp_avg_sqs, [], [], rows(), 4,
                                      False, False, 1, 0, 0)
    codes = [torch.zeros(p.shape, dtype=torch.bool) for p in bad.params]
    with pytest.raises(RuntimeError, match=r"masks\[0\] must be Byte, got Bool"):
        torch.ops.childopt.adamw_step(bad.params, bad.grads, bad.exp_avgs, bad.exp_avg_sqs, [], codes, rows(), 3,
                                      False, False, 1, 0, 0)


def test_float64_buckets_are_routed_to_the_reference(native_cpu):
    """The kernels cover fp32/bf16/fp16; route() sends a float64 bucket to the reference once."""
    assert not native_cpu.covers(torch.float64, torch.float64)
    assert backends.route(native_cpu, torch.float64, torch.float64).name == "reference"
    assert backends.route(native_cpu, torch.bfloat16, torch.float32) is native_cpu
    assert backends.route(native_cpu, torch.bfloat16, torch.float16).name == "reference"


def test_fp32_grads_on_bf16_params_match_the_reference(native_cpu):
    ours, ref = bucket(torch.bfloat16, False, MaskKind.NONE), bucket(torch.bfloat16, False, MaskKind.NONE)
    for t in (ours, ref):
        t.grads = [torch.randn(g.shape, generator=torch.Generator().manual_seed(9)) for g in t.grads]
    native_cpu.adamw_step(ours, rows(), mask_spec(MaskKind.NONE, False))
    reference.Backend().adamw_step(ref, rows(), mask_spec(MaskKind.NONE, False))
    for a, b in zip(outputs(ours), outputs(ref), strict=True):
        torch.testing.assert_close(a, b, rtol=2**-7, atol=1e-6)


def test_auto_takes_native_only_when_ready_without_compiling(monkeypatch):
    from childopt import _native

    calls = []
    monkeypatch.setattr(backends, "_announced", set())
    monkeypatch.setattr(_native, "try_load", lambda build=True: (calls.append(build), (None, "not built yet"))[1])
    assert backends.create("auto", torch.device("cpu")).name == "reference"
    assert calls == [False]
    with pytest.raises(RuntimeError, match="backend 'native' cannot run on cpu: childopt._C is not available"):
        backends.create("native", torch.device("cpu"))
    assert calls == [False, True]


def test_auto_takes_native_when_it_is_ready(native_cpu, monkeypatch):
    monkeypatch.setenv("CHILDOPT_BACKEND", "")
    assert backends.create("auto", torch.device("cpu")).name == "native"


def test_native_has_no_kernels_for_other_devices(native_cpu):
    ok, why = native.available(torch.device("meta"))
    assert not ok and "no kernels for meta" in why


def test_bucket_params_stay_on_their_dtypes(native_cpu):
    """bf16 params get the hand-rounded bits (round to nearest even) that torch's cast gives."""
    params = make_params([(4099,)], dtype=torch.bfloat16)
    table = rows()[:1]
    t = TensorLists(params=[p.detach() for p in params], grads=[torch.ones(4099, dtype=torch.bfloat16)],
                    exp_avgs=[torch.zeros(4099)], exp_avg_sqs=[torch.zeros(4099)])
    scalars = dict(zip(reference.contract.STEP_SCALAR_FIELDS, table[0].tolist()))
    expected = reference.adamw_math(t.params[0].float(), torch.ones(4099), torch.zeros(4099), torch.zeros(4099), None,
                                    scalars)[0].to(torch.bfloat16)
    native_cpu.adamw_step(t, table, mask_spec(MaskKind.NONE, False))
    assert torch.equal(t.params[0], expected)
