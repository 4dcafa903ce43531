"""The op contract: one schema per op for every backend, fake kernels that torch.library's
opcheck accepts, and the C++ step-scalar fields and mask kinds in the Python order."""
import re
from pathlib import Path

import pytest
import torch

from childopt import backends, philox
from childopt.backends import contract
from childopt.backends.contract import COLUMN, MaskKind, StepScalars

CSRC = Path(__file__).resolve().parents[2] / "csrc"


def _header_fields():
    text = (CSRC / "include" / "childopt" / "step_scalars.h").read_text()
    block = text[text.index("#define CHILDOPT_STEP_SCALAR_FIELDS(X)"):text.index("struct StepScalars")]
    return [name for _, name in re.findall(r"X\((\w+), (\w+)\)", block)]


def test_the_cpp_step_scalar_fields_are_the_python_ones_in_the_same_order():
    assert _header_fields() == list(contract.STEP_SCALAR_FIELDS)


def test_the_cpp_mask_kinds_are_the_python_ones():
    text = (CSRC / "include" / "childopt" / "step_scalars.h").read_text()
    cpp = {name.upper(): int(value) for name, value in re.findall(r"k(None|Dense|Bernoulli|Importance) = (\d+)", text)}
    assert cpp == {kind.name: int(kind) for kind in MaskKind}


def test_the_built_module_reports_the_same_fields_and_kinds():
    ok, why = backends.MODULES["native"].available(torch.device("cpu"))
    if not ok:
        pytest.skip(why)
    from childopt import _native

    module = _native.load()
    assert list(module.step_scalar_fields) == list(contract.STEP_SCALAR_FIELDS)
    assert dict(module.mask_kinds) == {kind.name: int(kind) for kind in MaskKind}


def test_mutated_arguments_come_from_the_schema_annotations():
    assert contract.mutated_args("adamw_step") == ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")
    assert contract.mutated_args("sparse_adamw_step") == ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")
    assert contract.mutated_args("fisher_accumulate") == ("fisher",)
    assert contract.mutated_args("radix_histogram") == ()


def test_every_backend_namespace_has_every_op_with_the_one_schema():
    for backend in contract.NAMESPACES:
        for op, schema in contract.SCHEMAS.items():
            declared = contract.op_handle(backend, op).default._schema
            assert declared == torch._C.parse_schema(contract.qualname(backend, op) + schema), (backend, op)


def _rows(n, step=2.0, maximize=False):
    hp = StepScalars(decay_before=0.999, decay_after=1.0, one_minus_beta1=0.1, beta2=0.999, one_minus_beta2=0.001,
                     eps=1e-8, step_size=0.01, bc2_sqrt=0.04, grad_scale=2.5, grad_sign=-1.0 if maximize else 1.0,
                     lerp_from_start=1.0, step=step, rng_base=0)
    rows = hp.rows(n)
    rows[:, COLUMN["rng_base"]] = torch.arange(n, dtype=torch.float64) * 7
    return rows


def _op_samples(op: str):
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (17,), (1,)]

    def randn(shape, dtype=torch.float32):
        return torch.randn(shape, generator=gen).to(dtype)

    if op == "adamw_step":
        for dtype in (torch.float32, torch.bfloat16):
            for kind in MaskKind:
                for amsgrad in (False, True):
                    masks = {MaskKind.DENSE: [randn(s) > 0 for s in shapes],
                             MaskKind.IMPORTANCE: [torch.randint(0, 256, s, generator=gen, dtype=torch.uint8)
                                                   for s in shapes]}.get(kind, [])
                    yield ([randn(s, dtype) for s in shapes], [randn(s, dtype) for s in shapes],
                           [randn(s) for s in shapes], [randn(s).abs() for s in shapes],
                           [randn(s).abs() + 1 for s in shapes] if amsgrad else [], masks, _rows(len(shapes)),
                           int(kind), kind == MaskKind.DENSE, amsgrad, philox.keep_threshold(0.4), 12345, 6)
    elif op == "sparse_adamw_step":
        for compact in (False, True):
            indices = [torch.tensor([0, 4, 9], dtype=torch.int32), torch.tensor([16], dtype=torch.int32),
                       torch.tensor([], dtype=torch.int32)]
            grads = [randn(len(i)) for i in indices] if compact else [randn(s) for s in shapes]
            yield ([randn(s) for s in shapes], grads, indices, [randn(len(i)) for i in indices],
                   [randn(len(i)).abs() for i in indices], [], _rows(len(shapes)), False, compact)
    elif op == "fisher_accumulate":
        yield [randn(s).abs() for s in shapes], [randn(s, torch.bfloat16) for s in shapes], torch.rand(3)
    else:
        yield [randn(s).abs() for s in shapes], [0, 1, 0], torch.zeros(2, dtype=torch.int64), 21, 11, 2


@pytest.mark.parametrize("op", list(contract.SCHEMAS))
@pytest.mark.parametrize("backend", list(contract.NAMESPACES))
def test_opcheck_passes_for_every_op_on_every_backend_that_runs_here(backend, op):
    """torch.library.opcheck: schema (mutations as declared), fake kernel, AOT dispatch."""
    ok, why = backends.MODULES[backend].available(torch.device("cpu"))
    if not ok:
        pytest.skip(why)
    backends.MODULES[backend].Backend()  # loads the native extension
    for args in _op_samples(op):
        torch.library.opcheck(contract.op_handle(backend, op).default, args)
