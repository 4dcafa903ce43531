"""The program compute-sanitizer checks: one kernel of one backend, stepped once on small shapes.

``python -m childopt.selftest.target --backend native --kernel adamw_step/bernoulli`` calls the
backend's op on a bucket of sizes 1, 3, 5, 1031 and 65537 in which every tensor is its own
allocation, starts one element in (a storage offset: misaligned for vector loads) and ends
exactly where its allocation ends, so a read or write past any tensor is outside every
allocation.  The selftest runs it with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that torch's caching
allocator does not pool the allocations, which would hide such accesses from memcheck.
adamw_step runs with amsgrad (every state buffer), zero-grad and freeze, fp32 and bf16 params
with fp32 gradients (importance: every uint8 level code); sparse_adamw_step with dense and
compact gradients; fisher_accumulate with fp32 and bf16 gradients; radix_histogram two passes
over three scopes.

Exit status 0 when the kernel ran, :data:`EXIT_SKIPPED` (with the reason on stderr) when the
backend cannot run on the device without compiling (the build step builds childopt._C first).
``--device cpu`` runs the same calls on CPU, for the tests of this program.
"""
from __future__ import annotations

import argparse
import sys

import torch

from childopt import backends, importance, philox
from childopt.backends import SparseTensorLists, TensorLists
from childopt.backends.contract import COLUMN, MaskKind, MaskSpec, StepScalars
from childopt.selftest.context import EXIT_SKIPPED
from childopt.selftest.verdict import KERNEL_BACKENDS, KERNELS

SIZES = (1, 3, 5, 1031, 65537)
SEED = 2**40 + 2**33 + 7


def own_allocation(values: torch.Tensor) -> torch.Tensor:
    """``values`` copied into a new allocation one element longer, as its last ``numel`` elements."""
    buffer = torch.empty(values.numel() + 1, dtype=values.dtype, device=values.device)
    view = buffer[1:]
    view.copy_(values)
    return view


def random(n: int, device, dtype=torch.float32, low: float = 0.0) -> torch.Tensor:
    return own_allocation((low + torch.rand(n, device=device)).to(dtype))


def scalar_rows(device, grad_scale: float = 1.0) -> torch.Tensor:
    """Step scalars of the bucket (step 3, weight decay before the update, Philox bases past 2**32)."""
    rows = StepScalars(decay_before=0.999, decay_after=1.0, one_minus_beta1=0.1, beta2=0.999, one_minus_beta2=0.001,
                       eps=1e-8, step_size=1e-3, bc2_sqrt=0.05, grad_scale=grad_scale, grad_sign=1.0,
                       lerp_from_start=1.0, step=3, rng_base=0).rows(len(SIZES))
    bases, total = [], 2**32 - 8
    for n in SIZES:
        bases.append(total)
        total += philox.rng_group_counts(n)
    rows[:, COLUMN["rng_base"]] = torch.tensor(bases, dtype=torch.float64)
    return rows.to(device)


def mask_lists(kind: MaskKind, device):
    """The bucket's ``masks``: bool (dense), random level codes (importance), else None."""
    if kind == MaskKind.DENSE:
        return [own_allocation(torch.rand(n, device=device) < 0.3) for n in SIZES]
    if kind == MaskKind.IMPORTANCE:
        return [own_allocation(torch.randint(importance.LEVEL_COUNT, (n,), device=device, dtype=torch.uint8))
                for n in SIZES]
    return None


def adamw_step(impl, kind: MaskKind, device) -> None:
    for param_dtype in (torch.float32, torch.bfloat16):
        for freeze in (False, True):
            lists = TensorLists(
                params=[random(n, device, param_dtype, low=-0.5) for n in SIZES],
                grads=[random(n, device, low=-0.5) for n in SIZES],
                exp_avgs=[random(n, device) for n in SIZES], exp_avg_sqs=[random(n, device) for n in SIZES],
                max_exp_avg_sqs=[random(n, device) for n in SIZES], masks=mask_lists(kind, device))
            scale = 1 / 0.3 if kind == MaskKind.BERNOULLI and not freeze else 1.0
            spec = MaskSpec(kind=kind, freeze=freeze and kind != MaskKind.NONE, seed=SEED,
                            keep_threshold=philox.keep_threshold(0.3) if kind == MaskKind.BERNOULLI else 1)
            impl.adamw_step(lists, scalar_rows(device, scale), spec)


def sparse_adamw_step(impl, device) -> None:
    indices = [own_allocation((torch.rand(n, device=device) < 0.3).nonzero().reshape(-1).to(torch.int32))
               for n in SIZES]
    for compact in (False, True):
        grads = [random(i.numel() if compact else n, device, low=-0.5) for n, i in zip(SIZES, indices)]
        moments = [[random(i.numel(), device) for i in indices] for _ in range(3)]
        impl.sparse_adamw_step(SparseTensorLists([random(n, device, low=-0.5) for n in SIZES], grads, indices,
                                                 *moments, compact_grads=compact), scalar_rows(device))


def fisher_accumulate(impl, device) -> None:
    for grad_dtype in (torch.float32, torch.bfloat16):
        impl.fisher_accumulate([random(n, device) for n in SIZES], [random(n, device, grad_dtype, -0.5) for n in SIZES],
                               torch.rand(len(SIZES), device=device))


def radix_histogram(impl, device) -> None:
    scores = [random(n, device, low=-0.5) for n in SIZES]
    scopes = [i % 3 for i in range(len(SIZES))]
    first = impl.radix_histogram(scores, scopes, torch.zeros(3, dtype=torch.int64, device=device), 24, 8, 3)
    impl.radix_histogram(scores, scopes, first.argmax(dim=1), 16, 8, 3)


def run(kernel: str, impl, device) -> None:
    """Call ``kernel`` (one of :data:`~childopt.selftest.verdict.KERNELS`) of ``impl`` on ``device``."""
    family, _, kind = kernel.partition("/")
    with torch.no_grad():
        if family == "adamw_step":
            adamw_step(impl, MaskKind.from_label(kind), device)
        else:
            {"sparse_adamw_step": sparse_adamw_step, "fisher_accumulate": fisher_accumulate,
             "radix_histogram": radix_histogram}[family](impl, device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m childopt.selftest.target",
                                     description="Step one kernel of one backend once on small shapes "
                                                 "(the program the selftest runs under compute-sanitizer).")
    parser.add_argument("--backend", choices=KERNEL_BACKENDS, required=True)
    parser.add_argument("--kernel", choices=KERNELS, required=True)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    module = backends.MODULES[args.backend]
    ok, why = backends.check_ready(module, device)  # never compiles childopt._C under the sanitizer
    if not ok:
        print(f"skipped: {args.backend} cannot run on {device}: {why}", file=sys.stderr)
        return EXIT_SKIPPED
    run(args.kernel, module.Backend(), device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"{args.kernel} of {args.backend} ran on {device}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
