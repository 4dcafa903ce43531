"""The CUDA lane of ``python -m childopt selftest`` (issue #18): the kernels of Triton and native on a
GPU against the oracles, at the sizes that break multi-tensor launches.

* Bernoulli and importance masks bit for bit against childopt.philox (the plain-torch definition;
  importance: its words under each level code's threshold, childopt.importance) and the
  reference backend, ``masked="freeze"`` and ``"zero_grad"``, at 1, 3, 5, 65535, 65537 and
  320 * 65536 + 5 elements, 40 tensors in one bucket (one op call per step), with the
  optimizer's Philox numbering pushed past 2**32 (the counter's low word wraps inside a tensor);
  bf16 parameters with fp32 gradients.
* Parameters, gradients and moments that are slices of bigger buffers, at storage offsets 1-3
  (misaligned for vector loads): nothing outside the slices is written.
* sparse_adamw_step, fisher_accumulate and radix_histogram against the reference at the same sizes.
* One tensor of 2**31 + 5 elements (slow: ~26 GB), its head and its tail past index 2**31.
* ``opt.step()`` captured in a CUDA graph (capturable=True) and a ``torch.compile``d step,
  against eager steps.

How the masks are read back: with beta1 = 0, ``exp_avg`` after a step is ``g * grad_scale`` on
kept entries, and 0 (zero_grad) or its previous value (freeze) on dropped ones; the gradients of
step t lie in [t, t + 0.5), so the kept set of step t is ``exp_avg != 0`` or ``exp_avg >= t``.
``exp_avg`` involves no rounding the backends could disagree on, so it is compared bit for bit;
parameters and ``exp_avg_sq`` within fp32 tolerances (:data:`VALUE_TOLERANCE`, :data:`V_TOLERANCE`).

Every test also runs on CPU where that is cheap (native CPU; Triton interpreted, on a smaller
bucket since the interpreter costs ~0.3 s per program), so this file proves its logic in every CI
run; the GPU-only tests are marked ``cuda``.  Each test names its selftest verdict cell (kernel,
backend, device) as JUnit properties through ``Item.user_properties``; see :func:`verdict_cell`.
"""
import math

import pytest
import torch

from childopt import Importance, MaskedAdamW, backends, importance, philox
from childopt.backends import SparseTensorLists, TensorLists, reference
from childopt.backends.contract import COLUMN, MaskKind, MaskSpec, StepScalars
from childopt.selftest.verdict import KERNELS
from tests.helpers import capture_step

SEED = 2**40 + 2**33 + 7  # both key words non-zero
RESERVE_P = 0.3
LANE_SIZES = (1, 3, 5, 65535, 65537, 320 * 65536 + 5)
BUCKET_LEN = 40
BIG = 2**31 + 5
F32, BF16 = torch.float32, torch.bfloat16
# Parameters: as test_kernel_backends.py's CUDA test at real sizes (bf16: one unit of the last place).
# exp_avg_sq is the same fp32 multiplies and add on every backend: a few ulps at most.
VALUE_TOLERANCE = {F32: dict(rtol=1e-5, atol=1e-6), BF16: dict(rtol=2**-7, atol=1e-6)}
V_TOLERANCE = dict(rtol=1e-6, atol=0.0)


def bucket_sizes(backend: str, device: str) -> list[int]:
    """The lane sizes, then small sizes of every residue mod 4, up to the bucket's length.

    On CPU the 21M-element tensor is left out, and the interpreted Triton bucket holds 6 tensors.
    """
    if device == "cuda":
        head, count = LANE_SIZES, BUCKET_LEN
    elif backend == "native":
        head, count = LANE_SIZES[:5], BUCKET_LEN
    else:
        head, count = (1, 3, 5, 1031), 6
    return list(head) + [2 + 7 * i for i in range(count - len(head))]


@pytest.fixture(autouse=True)
def verdict_cell(request):
    """Name this test's cell of the selftest verdict in the JUnit XML: its kernel, backend, device.

    Autouse fixtures are set up before the lane fixtures, so a lane that skips (a backend that
    cannot run here) is still reported against its cell, with its reason.
    """
    params = request.node.callspec.params
    backend, device = params["kernel_lane"] if "kernel_lane" in params else (params["cuda_backend"], "cuda")
    assert params["kernel"] in KERNELS, f"{params['kernel']!r} is not one of {KERNELS}"
    request.node.user_properties += [("kernel", params["kernel"]), ("backend", backend), ("device", device)]


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """torch.equal, and on failure how many entries differ and the first one."""
    if torch.equal(actual, expected):
        return
    differ = (actual != expected).reshape(-1).nonzero()
    first = int(differ[0]) if differ.numel() else None
    raise AssertionError(f"{what}: {differ.numel()} of {actual.numel()} entries differ, first at index {first} "
                         f"({actual.reshape(-1)[first].item() if first is not None else ''} vs "
                         f"{expected.reshape(-1)[first].item() if first is not None else ''})")


def push_rng_bases_past_2_32(opt: MaskedAdamW, params: list) -> list:
    """Renumber the params' Philox groups (the optimizer's own numbering, MaskedAdamW._number) as if
    ~2**34 elements of other parameters came first: the counter's low word wraps two groups into
    the biggest tensor, and every later tensor's base is past 2**32.  Returns the int bases."""
    big = max(params, key=torch.Tensor.numel)
    shift = 2**32 - 2 - int(opt._rng_bases[big])
    for p in params:
        opt._rng_bases[p] = opt._rng_bases[p] + shift  # an int, or a device scalar under capturable
    return [int(opt._rng_bases[p]) for p in params]


def lane_grads(sizes, step: int, gen: torch.Generator, device, dtype=F32) -> list:
    """Gradients of ``step`` in [step, step + 0.5): never 0, and above every earlier step's."""
    return [(step + 0.5 * torch.rand(n, generator=gen, device=device)).to(dtype) for n in sizes]


def set_grad(p: torch.nn.Parameter, g: torch.Tensor) -> None:
    """``p.grad = g``; an fp32 gradient of a bf16 parameter needs ``Tensor.grad_dtype`` (the
    slices test steps that pair through the op on any torch)."""
    if g.dtype != p.dtype:
        if not hasattr(p, "grad_dtype"):
            pytest.skip(f"torch {torch.__version__} has no Tensor.grad_dtype: a {p.dtype} parameter cannot hold "
                        f"a {g.dtype} .grad")
        p.grad_dtype = g.dtype
    p.grad = g


def masked_optimizer(params, kind: str, masked, backend: str, gen: torch.Generator, **kwargs) -> MaskedAdamW:
    """beta1 = 0 (exp_avg shows the masks), weight decay 0.1, the lane's seed and keep probability.

    Importance: given log-normal scores (sigma 3), so the level codes span many levels; one draw of
    the codes (at the first step) for the test's steps.
    """
    if kind == "importance":
        scores = {p: torch.randn(p.shape, generator=gen, device=p.device).mul(3).exp() for p in params}
        mask = Importance(scores=scores, refresh_every=100)
    else:
        mask = {"none": None, "bernoulli": "bernoulli",
                "dense": {p: torch.rand(p.shape, generator=gen, device=p.device) < 0.3 for p in params}}[kind]
    return MaskedAdamW(params, lr=1e-2, betas=(0.0, 0.999), weight_decay=0.1, mask=mask,
                       reserve_p=RESERVE_P if kind in ("bernoulli", "importance") else 1.0, masked=masked, seed=SEED,
                       backend=backend, **kwargs)


def importance_keep(codes: torch.Tensor, base: int, step: int) -> torch.Tensor:
    """The contract's importance draw: the element's Philox word under its level code's threshold."""
    codes = codes.reshape(-1)
    return philox.random_words(codes.numel(), base, SEED, step, codes.device) < importance.level_thresholds(codes)


def expected_keep(opt: MaskedAdamW, p, kind: str, base: int, step: int) -> torch.Tensor:
    """The oracle's keep-mask of ``p`` at ``step``: all, its dense mask, or the Philox definition."""
    if kind == "dense":
        return opt.state[p]["mask"].reshape(-1)
    if kind == "bernoulli":
        return philox.bernoulli_keep(p.numel(), base, SEED, step, RESERVE_P, p.device)
    if kind == "importance":
        return importance_keep(opt.state[p]["importance"], base, step)
    return torch.ones(p.numel(), dtype=torch.bool, device=p.device)


def step_bucket(backend: str, device: str, sizes, kind: str, masked, param_dtype, steps: int = 2,
                oracle: bool = True) -> dict:
    """``steps`` steps of one bucket of ``sizes`` through MaskedAdamW, the same data for every backend:
    parameters before and after each step, moments after each, op calls, Philox bases and (with
    ``oracle``) the oracle's keep-masks of each step; importance: the level codes after the steps."""
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen, device=device).to(param_dtype)) for n in sizes]
    opt = masked_optimizer(params, kind, masked, backend, gen)
    bases = push_rng_bases_past_2_32(opt, params)
    impl = opt._backend(params[0].device)
    calls = []
    op = impl.adamw_step
    impl.adamw_step = lambda *args: (calls.append(1), op(*args))[1]
    history = [[p.detach().clone() for p in params]]
    states = []
    for t in range(1, steps + 1):
        for p, g in zip(params, lane_grads(sizes, t, gen, device)):
            set_grad(p, g)
        opt.step()
        history.append([p.detach().clone() for p in params])
        states.append([(opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()) for p in params])
    keeps = [[expected_keep(opt, p, kind, base, t) for p, base in zip(params, bases)] for t in range(1, steps + 1)] \
        if oracle else None
    codes = [opt.state[p]["importance"].clone() for p in params] if kind == "importance" else None
    return dict(params=history, states=states, keeps=keeps, calls=len(calls), bases=bases, codes=codes)


ADAMW_CASES = [
    pytest.param("adamw_step/none", None, F32, id="none-fp32"),
    pytest.param("adamw_step/dense", "freeze", F32, id="dense-freeze-fp32"),
    pytest.param("adamw_step/bernoulli", "freeze", F32, id="bernoulli-freeze-fp32"),
    pytest.param("adamw_step/bernoulli", "zero_grad", F32, id="bernoulli-zero_grad-fp32"),
    pytest.param("adamw_step/bernoulli", "freeze", BF16, id="bernoulli-freeze-bf16-fp32-grads"),
    pytest.param("adamw_step/bernoulli", "zero_grad", BF16, id="bernoulli-zero_grad-bf16-fp32-grads"),
    pytest.param("adamw_step/importance", "freeze", F32, id="importance-freeze-fp32"),
    pytest.param("adamw_step/importance", "zero_grad", F32, id="importance-zero_grad-fp32"),
]


@pytest.mark.parametrize("kernel,masked,param_dtype", ADAMW_CASES)
def test_masks_are_bit_exact_in_one_bucket_past_2_32(kernel_lane, kernel, masked, param_dtype):
    """40 tensors of the lane sizes in one op call per step, two steps, Philox groups past 2**32:
    the kept entries equal the oracle's mask bit for bit, exp_avg equals the reference bit for
    bit, frozen parameters keep their bits, and the rest agrees with the reference."""
    backend, device = kernel_lane
    kind = kernel.split("/")[1]
    sizes = bucket_sizes(backend, device)
    ours = step_bucket(backend, device, sizes, kind, masked, param_dtype)
    ref = step_bucket("reference", device, sizes, kind, masked, param_dtype, oracle=False)
    assert ours["calls"] == 2, f"{ours['calls']} op calls for 2 steps of one bucket"
    assert ours["bases"][-1] > 2**32 and ours["bases"][0] < 2**32
    if kind == "importance":
        for i, (codes, ref_codes) in enumerate(zip(ours["codes"], ref["codes"])):
            assert_same_bits(codes, ref_codes, f"tensor {i}: importance level codes vs the reference's")
    for t, (states, ref_states, keeps) in enumerate(zip(ours["states"], ref["states"], ours["keeps"]), start=1):
        for i, n in enumerate(sizes):
            where = f"tensor {i} ({n} elements), step {t}"
            (m, v), (ref_m, ref_v) = states[i], ref_states[i]
            kept = (m != 0) if masked == "zero_grad" else (m >= t)
            assert_same_bits(kept, keeps[i], f"{where}: kept entries vs the {kind} mask")
            assert_same_bits(m, ref_m, f"{where}: exp_avg vs the reference")
            p, before = ours["params"][t][i], ours["params"][t - 1][i]
            if masked == "freeze":
                assert_same_bits(p[~keeps[i]], before[~keeps[i]], f"{where}: frozen parameters")
            torch.testing.assert_close(p, ref["params"][t][i], **VALUE_TOLERANCE[param_dtype],
                                       msg=lambda text: f"{where}: params: {text}")
            torch.testing.assert_close(v, ref_v, **V_TOLERANCE, msg=lambda text: f"{where}: exp_avg_sq: {text}")


def slices_of_one_buffer(sizes, dtype, gen, device, fill):
    """Tensors of ``sizes`` cut from one buffer, each after a gap of 1-3 elements (its storage
    offset is never a multiple of 4), the buffer randomised first so gap writes show."""
    gaps = [1 + i % 3 for i in range(len(sizes))]
    buffer = torch.rand(sum(sizes) + sum(gaps) + 3, generator=gen, device=device).to(dtype)
    views, start = [], 0
    for n, gap in zip(sizes, gaps):
        start += gap
        views.append(buffer[start:start + n])
        views[-1].copy_(fill(n))
        start += n
    return buffer, views


def lane_rows(n: int, bases, device, *, grad_scale=1.0, step=1) -> torch.Tensor:
    """Step scalars of ``n`` tensors: beta1 = 0 (lerp from the end), decay before, Philox ``bases``."""
    rows = StepScalars(decay_before=1 - 1e-3, decay_after=1.0, one_minus_beta1=1.0, beta2=0.999,
                       one_minus_beta2=0.001, eps=1e-8, step_size=1e-2, bc2_sqrt=math.sqrt(0.001),
                       grad_scale=grad_scale, grad_sign=1.0, lerp_from_start=0.0, step=step, rng_base=0).rows(n)
    rows[:, COLUMN["rng_base"]] = torch.tensor(bases, dtype=torch.float64)
    return rows.to(device)


def offset_bucket(sizes, kind, param_dtype, device):
    """A bucket whose params, grads, moments (and masks) are slices of one buffer per role."""
    gen = torch.Generator(device=device).manual_seed(1)
    roles = {
        "params": slices_of_one_buffer(sizes, param_dtype, gen, device,
                                       lambda n: torch.randn(n, generator=gen, device=device)),
        "grads": slices_of_one_buffer(sizes, F32, gen, device, lambda n: lane_grads([n], 1, gen, device)[0]),
        "exp_avgs": slices_of_one_buffer(sizes, F32, gen, device, lambda n: torch.zeros(n, device=device)),
        "exp_avg_sqs": slices_of_one_buffer(sizes, F32, gen, device, lambda n: torch.zeros(n, device=device)),
    }
    if kind == MaskKind.DENSE:
        roles["masks"] = slices_of_one_buffer(sizes, torch.bool, gen, device,
                                              lambda n: torch.rand(n, generator=gen, device=device) < 0.3)
    if kind == MaskKind.IMPORTANCE:  # every level code, 0 (never kept) to 255 (always)
        roles["masks"] = slices_of_one_buffer(sizes, torch.uint8, gen, device, lambda n: torch.randint(
            importance.LEVEL_COUNT, (n,), generator=gen, device=device, dtype=torch.uint8))
    return roles


@pytest.mark.parametrize("kernel,masked,param_dtype", [
    pytest.param("adamw_step/bernoulli", "freeze", F32, id="bernoulli-freeze-fp32"),
    pytest.param("adamw_step/bernoulli", "zero_grad", BF16, id="bernoulli-zero_grad-bf16-fp32-grads"),
    pytest.param("adamw_step/dense", "freeze", F32, id="dense-freeze-fp32"),
    pytest.param("adamw_step/importance", "zero_grad", F32, id="importance-zero_grad-fp32"),
])
def test_slices_at_storage_offsets_1_to_3(kernel_lane, kernel, masked, param_dtype):
    """Every tensor of the bucket is a slice of a bigger buffer at an odd offset: the kernels step
    exactly the slices (the gaps between them keep their bits) and match the reference."""
    backend, device = kernel_lane
    kind = MaskKind.from_label(kernel.split("/")[1])
    sizes = bucket_sizes(backend, device)
    bases = [2**32 - 2 + sum(philox.rng_group_counts(n) for n in sizes[:i]) for i in range(len(sizes))]
    grad_scale = 1 / RESERVE_P if kind == MaskKind.BERNOULLI and masked == "zero_grad" else 1.0
    rows = lane_rows(len(sizes), bases, device, grad_scale=grad_scale)
    spec = MaskSpec(kind=kind, freeze=masked == "freeze", seed=SEED,
                    keep_threshold=philox.keep_threshold(RESERVE_P) if kind == MaskKind.BERNOULLI else 1)
    results = {}
    for name in (backend, "reference"):
        roles = offset_bucket(sizes, kind, param_dtype, device)
        buffers_before = {role: buffer.clone() for role, (buffer, _) in roles.items()}
        views = {role: v for role, (_, v) in roles.items()}
        backends.MODULES[name].Backend().adamw_step(TensorLists(**views), rows, spec)
        results[name] = roles
        for role, (buffer, role_views) in roles.items():
            inside = torch.zeros(buffer.numel(), dtype=torch.bool, device=device)
            for view in role_views:
                inside[view.storage_offset():view.storage_offset() + view.numel()] = True
            assert_same_bits(buffer[~inside], buffers_before[role][~inside], f"{name}: {role} outside the slices")
    for i, n in enumerate(sizes):
        m, ref_m = results[backend]["exp_avgs"][1][i], results["reference"]["exp_avgs"][1][i]
        if kind == MaskKind.BERNOULLI:
            keep = philox.bernoulli_keep(n, bases[i], SEED, 1, RESERVE_P, device)
        elif kind == MaskKind.IMPORTANCE:
            keep = importance_keep(results[backend]["masks"][1][i], bases[i], 1)
        else:
            keep = results[backend]["masks"][1][i]
        assert_same_bits(m != 0, keep, f"tensor {i} ({n} elements): kept entries vs the {kind.label} mask")
        assert_same_bits(m, ref_m, f"tensor {i} ({n} elements): exp_avg vs the reference")
        torch.testing.assert_close(results[backend]["params"][1][i], results["reference"]["params"][1][i],
                                   **VALUE_TOLERANCE[param_dtype])
        torch.testing.assert_close(results[backend]["exp_avg_sqs"][1][i], results["reference"]["exp_avg_sqs"][1][i],
                                   **V_TOLERANCE)


@pytest.mark.parametrize("kernel", ["sparse_adamw_step"])
@pytest.mark.parametrize("compact", [False, True], ids=["dense-grads", "compact-grads"])
def test_sparse_adamw_step_matches_the_reference(kernel_lane, kernel, compact):
    """~30% of every tensor's entries selected; unselected entries keep their bits."""
    backend, device = kernel_lane
    sizes = bucket_sizes(backend, device)
    rows = lane_rows(len(sizes), [0] * len(sizes), device)
    results = {}
    for name in (backend, "reference"):
        gen = torch.Generator(device=device).manual_seed(2)
        params = [torch.randn(n, generator=gen, device=device) for n in sizes]
        indices = [(torch.rand(n, generator=gen, device=device) < 0.3).nonzero().reshape(-1).to(torch.int32)
                   for n in sizes]
        grads = lane_grads(sizes, 1, gen, device)
        if compact:
            grads = [g[i.long()] for g, i in zip(grads, indices)]
        before = [p.clone() for p in params]
        moments = [[torch.zeros(i.numel(), device=device) for i in indices] for _ in range(2)]
        backends.MODULES[name].Backend().sparse_adamw_step(
            SparseTensorLists(params, grads, indices, *moments, compact_grads=compact), rows)
        for p, old, idx in zip(params, before, indices):
            untouched = torch.ones(p.numel(), dtype=torch.bool, device=device)
            untouched[idx.long()] = False
            assert_same_bits(p[untouched], old[untouched], f"{name}: unselected entries")
        results[name] = (params, *moments)
    for ours, ref in zip(results[backend], results["reference"]):
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, **VALUE_TOLERANCE[F32])


@pytest.mark.parametrize("kernel", ["fisher_accumulate"])
@pytest.mark.parametrize("grad_dtype", [F32, BF16], ids=["fp32-grads", "bf16-grads"])
def test_fisher_accumulate_matches_the_reference(kernel_lane, kernel, grad_dtype):
    backend, device = kernel_lane
    sizes = bucket_sizes(backend, device)
    results = {}
    for name in (backend, "reference"):
        gen = torch.Generator(device=device).manual_seed(3)
        fisher = [torch.rand(n, generator=gen, device=device) for n in sizes]
        grads = [torch.randn(n, generator=gen, device=device).to(grad_dtype) for n in sizes]
        scales = torch.rand(len(sizes), generator=gen, device=device)
        backends.MODULES[name].Backend().fisher_accumulate(fisher, grads, scales)
        results[name] = fisher
    for a, b in zip(results[backend], results["reference"]):
        torch.testing.assert_close(a, b, **VALUE_TOLERANCE[F32])


@pytest.mark.parametrize("kernel", ["radix_histogram"])
def test_radix_histogram_matches_the_reference(kernel_lane, kernel):
    """Two radix passes (the top byte, then the next under each scope's prefix) over scores in
    three scopes, signed zeros, infinities, NaN and a denormal among them: counts bit for bit."""
    backend, device = kernel_lane
    sizes = bucket_sizes(backend, device)
    gen = torch.Generator(device=device).manual_seed(4)
    scores = [torch.randn(n, generator=gen, device=device) for n in sizes]
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-40], device=device)
    big = max(scores, key=torch.Tensor.numel)
    big[:specials.numel()] = specials[:big.numel()]
    scopes = [i % 3 for i in range(len(sizes))]
    ours, ref = backends.MODULES[backend].Backend(), reference.Backend()
    prefixes = torch.zeros(3, dtype=torch.int64, device=device)
    first = ours.radix_histogram(scores, scopes, prefixes, 24, 8, 3)
    assert_same_bits(first, ref.radix_histogram(scores, scopes, prefixes, 24, 8, 3), "top byte histogram")
    prefixes = first.argmax(dim=1)
    second = ours.radix_histogram(scores, scopes, prefixes, 16, 8, 3)
    assert_same_bits(second, ref.radix_histogram(scores, scopes, prefixes, 16, 8, 3), "second byte histogram")


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["adamw_step/bernoulli"])
def test_a_tensor_of_2_31_plus_5_elements_is_stepped_to_its_end(cuda_backend, kernel):
    """int64 indexing: bf16 params and grads, fp32 moments (~26 GB).  Head and tail (across index
    2**31) against the Philox definition, bit for bit: exp_avg = 2 g where kept, 0 elsewhere;
    without weight decay dropped entries keep their bits and kept ones move."""
    need = BIG * (2 + 2 + 4 + 4) + 2 * 2**30
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB are free")
    p = torch.nn.Parameter(torch.ones(BIG, dtype=BF16, device="cuda"))
    p.grad = torch.ones_like(p)
    tail_start = (BIG - 4096) // 4 * 4
    p.grad[tail_start:] = 2.0
    opt = MaskedAdamW([p], lr=1e-2, betas=(0.0, 0.999), weight_decay=0.0, mask="bernoulli", reserve_p=0.5,
                      masked="zero_grad", seed=SEED, backend=cuda_backend)
    opt.step()
    for start in (0, tail_start):
        part = slice(start, min(start + 4101, BIG))
        n = part.stop - part.start
        keep = philox.random_words(n, start // 4, SEED, 1, "cuda") < philox.keep_threshold(0.5)
        g = p.grad[part].float()
        assert_same_bits(opt.state[p]["exp_avg"][part], torch.where(keep, g * 2.0, 0.0), f"exp_avg[{part}]")
        assert bool((p.detach()[part][~keep] == 1).all()) and bool((p.detach()[part][keep] < 1).all())
    del opt, p
    torch.cuda.empty_cache()


def twin_buckets(backend: str, kind: str, **kwargs):
    """The 40-tensor CUDA bucket twice (same data), each with its optimizer and Philox bases past 2**32."""
    sizes = bucket_sizes(backend, "cuda")
    twins = []
    for _ in range(2):
        gen = torch.Generator(device="cuda").manual_seed(5)
        params = [torch.nn.Parameter(torch.randn(n, generator=gen, device="cuda")) for n in sizes]
        opt = masked_optimizer(params, kind, "zero_grad" if kind == "bernoulli" else None, backend, gen, **kwargs)
        push_rng_bases_past_2_32(opt, params)
        twins.append((params, opt))
    return sizes, twins


def assert_twins_equal(twins, what: str) -> None:
    (params, opt), (twin_params, twin_opt) = twins
    for i, (p, q) in enumerate(zip(params, twin_params)):
        assert_same_bits(p.detach(), q.detach(), f"{what}: params[{i}]")
        for key in ("exp_avg", "exp_avg_sq"):
            assert_same_bits(opt.state[p][key], twin_opt.state[q][key], f"{what}: {key}[{i}]")


@pytest.mark.parametrize("kernel", ["adamw_step/none", "adamw_step/dense", "adamw_step/bernoulli"])
def test_a_cuda_graph_captures_the_step(cuda_backend, kernel):
    """capturable=True: after 3 warm-up steps, one captured ``opt.step()`` replayed 3 times (new
    gradients copied in each time) equals 3 more eager steps bit for bit; the step counts and
    the Bernoulli draws advance on the device."""
    sizes, twins = twin_buckets(cuda_backend, kernel.split("/")[1], capturable=True)
    (params, opt), (eager_params, eager) = twins
    gen = torch.Generator(device="cuda").manual_seed(6)
    for p, q, g in zip(params, eager_params, lane_grads(sizes, 1, gen, "cuda")):
        p.grad, q.grad = g.clone(), g.clone()
    graph = capture_step(opt)
    for _ in range(3):
        eager.step()
    for t in range(2, 5):
        for p, q, g in zip(params, eager_params, lane_grads(sizes, t, gen, "cuda")):
            p.grad.copy_(g)
            q.grad.copy_(g)
        graph.replay()
        eager.step()
    torch.cuda.synchronize()
    assert all(int(opt.state[p]["step"]) == 6 for p in params)
    assert_twins_equal(twins, "graph replay vs eager")


@pytest.mark.parametrize("kernel", ["adamw_step/bernoulli"])
def test_a_compiled_step_matches_eager(cuda_backend, kernel):
    """``torch.compile`` of a function calling ``opt.step()``, 3 steps, against the eager twin:
    exp_avg (the masks) bit for bit, parameters within fp32 tolerance (inductor computes the
    float64 step scalars in its own kernels; tests/optim/test_compile.py holds them bit for bit
    on CPU)."""
    torch._dynamo.reset()
    sizes, twins = twin_buckets(cuda_backend, "bernoulli")
    (params, opt), (eager_params, eager) = twins
    compiled = torch.compile(lambda: opt.step())
    gen = torch.Generator(device="cuda").manual_seed(7)
    for t in range(1, 4):
        for p, q, g in zip(params, eager_params, lane_grads(sizes, t, gen, "cuda")):
            p.grad, q.grad = g.clone(), g.clone()
        compiled()
        eager.step()
    for i, (p, q) in enumerate(zip(params, eager_params)):
        assert_same_bits(opt.state[p]["exp_avg"], eager.state[q]["exp_avg"], f"compiled vs eager: exp_avg[{i}]")
        torch.testing.assert_close(p.detach(), q.detach(), **VALUE_TOLERANCE[F32])


@pytest.mark.parametrize("kernel", ["adamw_step/none", "adamw_step/dense", "adamw_step/bernoulli",
                                    "sparse_adamw_step"])
def test_an_eager_step_never_makes_the_host_wait(cuda_backend, kernel, monkeypatch):
    """``torch.cuda.set_sync_debug_mode("error")`` through three eager steps (after one that builds
    the state), with new gradients each time and, on Triton, the launch tables built again every
    step (the plan cache emptied; counted): no blocking copy or synchronisation, as torch's fused
    step (childopt.transfer).  Clipping is left out: a fixed mask's ``grad[mask]`` waits."""
    from childopt.backends import triton as triton_backend
    from childopt.kernels import multi_tensor

    built = []
    make_plan = multi_tensor.make_plan
    monkeypatch.setattr(multi_tensor, "make_plan", lambda *a, **k: (built.append(1), make_plan(*a, **k))[1])
    kind = kernel.split("/")[1] if "/" in kernel else "dense"
    gen = torch.Generator(device="cuda").manual_seed(8)
    sizes = [1, 65537, 3 * 65536 + 5]
    params = [torch.nn.Parameter(torch.randn(n, generator=gen, device="cuda")) for n in sizes]
    storage = {"storage": "sparse"} if kernel == "sparse_adamw_step" else {}
    opt = masked_optimizer(params, kind, None, cuda_backend, gen, **storage)
    for step in range(1, 5):
        for p, g in zip(params, lane_grads(sizes, step, gen, "cuda")):
            p.grad = g
        if step == 1:
            opt.step()
            continue
        triton_backend._plans.clear()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert all(int(opt.state[p]["step"]) == 4 for p in params)
    assert len(built) >= (4 if cuda_backend == "triton" else 0)
