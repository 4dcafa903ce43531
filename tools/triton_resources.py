"""Compile childopt's Triton kernels ahead of time for a GPU arch, on any machine.

Triton's wheel carries ptxas, so compilation, register counts, spills and
whether the loads became 128-bit vectors can be checked without a GPU, which the interpreter
cannot show; so can shared-memory barriers (layout conversions) and ordered atomics with their
fences (from the PTX and the SASS).  Prints one JSON object per variant:

    python tools/triton_resources.py [--arch 90] [--block 1024] [--iters N] [--kernel radix_histogram ...]

Must run without TRITON_INTERPRET (the kernel has to be a compiled JITFunction).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from childopt.kernels import fisher_accumulate, masked_adamw, multi_tensor, radix_histogram, sparse_adamw

TRITON_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
INTEGERS = {"keep_threshold", "seed_lo", "seed_hi", "shift"}
KERNELS = ("masked_adamw", "sparse_adamw", "radix_histogram", "fisher_accumulate")


def _compile(fn, pointer_types: dict, constexprs: dict, arch: int) -> dict:
    """Compile ``fn`` for ``arch`` with 16-byte aligned pointers; report vectors, barriers, atomics and resources."""
    names = fn.arg_names
    signature = {n: pointer_types.get(n) or ("constexpr" if n in constexprs else "i64" if n in INTEGERS else "fp32")
                 for n in names}
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(names.index(k),): v for k, v in constexprs.items()},
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in pointer_types})
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                            options={"enable_fp_fusion": multi_tensor.FP_FUSION})
    ptx = kernel.asm["ptx"]
    return dict(num_warps=kernel.metadata.num_warps,
                vector_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.v[248]\.", ptx)),
                vector_stores=len(re.findall(r"st\.global(?:\.\w+)*\.v[248]\.", ptx)),
                load_bits=_load_widths(ptx), **_sync_counts(ptx, kernel.asm["sass"]), **_resource_usage(ptx))


def _load_widths(ptx: str) -> dict:
    """Global load instructions by width in bits (vector length x element bits): ``{"128": 8, "8": 32}``."""
    widths = {}
    for vec, bits in re.findall(r"ld\.global(?:\.[\w:]+)*?(?:\.v([248]))?\.[bsuf](8|16|32|64)\b", ptx):
        width = str(int(vec or 1) * int(bits))
        widths[width] = widths.get(width, 0) + 1
    return dict(sorted(widths.items(), key=lambda kv: -int(kv[0])))


def _sync_counts(ptx: str, sass: str) -> dict:
    """Static counts of what serialises a kernel: CTA barriers (``bar.sync``, the mark of a layout
    conversion through shared memory), global atomics, the ordered ones among them (acq_rel /
    acquire / release / sc; PTX's default is relaxed) and the fences ptxas puts in SASS for them."""
    atomics = re.findall(r"\b(?:atom|red)\.global((?:\.[\w:]+)*)", ptx)
    return dict(bar_sync=len(re.findall(r"\b(?:bar|barrier)\.sync\b", ptx)),
                atomics=len(atomics),
                ordered_atomics=sum(bool(re.search(r"\.(?:acq_rel|acquire|release|sc)\b", q)) for q in atomics),
                ptx_fences=len(re.findall(r"\b(?:membar|fence)\.", ptx)),
                sass_membar=len(re.findall(r"\bMEMBAR\b", sass)),
                sass_atomics=len(re.findall(r"\b(?:ATOMG|REDG|ATOM|RED)\.", sass)))


def compile_variant(arch: int, param_dtype: str, mask_kind: int, freeze: bool, amsgrad: bool,
                    block: int, iters: int) -> dict:
    """One variant of the dense masked kernel."""
    p_type = TRITON_TYPES[param_dtype]
    pointers = dict(zip(("p_base", "g_base", "m_base", "v_base", "vmax_base", "mask_base", "table", "chunk_tensor",
                         "chunk_start", "scalars"),
                        (f"*{p_type}", f"*{p_type}", "*fp32", "*fp32", "*fp32", "*u8", "*i64", "*i32", "*i64", "*fp64")))
    align = 16 // {"fp32": 4, "bf16": 2, "fp16": 2}[p_type]
    constexprs = dict(MASK_KIND=mask_kind, FREEZE=freeze, AMSGRAD=amsgrad, P_ALIGN=align, G_ALIGN=align, S_ALIGN=4,
                      MASK_ALIGN=16, BLOCK=block, ITERS=iters)
    return dict(kernel="masked_adamw", arch=arch, param_dtype=param_dtype, mask_kind=mask_kind, freeze=freeze,
                amsgrad=amsgrad, block=block, iters=iters,
                **_compile(masked_adamw.masked_adamw_kernel, pointers, constexprs, arch))


def compile_sparse_variant(arch: int, param_dtype: str, compact_grads: bool, amsgrad: bool,
                           block: int, iters: int) -> dict:
    """One variant of the sparse-index kernel (int32 indices)."""
    p_type = TRITON_TYPES[param_dtype]
    pointers = dict(zip(("p_base", "g_base", "idx_base", "m_base", "v_base", "vmax_base", "table", "chunk_tensor",
                         "chunk_start", "scalars"),
                        (f"*{p_type}", f"*{p_type}", "*i32", "*fp32", "*fp32", "*fp32", "*i64", "*i32", "*i64",
                         "*fp64")))
    constexprs = dict(COMPACT_GRADS=compact_grads, AMSGRAD=amsgrad,
                      G_ALIGN=16 // {"fp32": 4, "bf16": 2, "fp16": 2}[p_type] if compact_grads else 1, I_ALIGN=4,
                      S_ALIGN=4, BLOCK=block, ITERS=iters)
    return dict(kernel="sparse_adamw", arch=arch, param_dtype=param_dtype, compact_grads=compact_grads,
                amsgrad=amsgrad, block=block, iters=iters,
                **_compile(sparse_adamw.sparse_adamw_kernel, pointers, constexprs, arch))


def compile_histogram_variant(arch: int, bits: int, check_prefix: bool, block: int, iters: int) -> dict:
    """One pass of the radix-select histogram kernel over fp32 scores."""
    pointers = {"s_base": "*fp32", "table": "*i64", "chunk_tensor": "*i32", "chunk_start": "*i64", "hist": "*i64",
                "prefixes": "*i64"}
    constexprs = dict(BITS=bits, CHECK_PREFIX=check_prefix, S_ALIGN=4, BLOCK=block, ITERS=iters)
    return dict(kernel="radix_histogram", arch=arch, bits=bits, check_prefix=check_prefix, block=block, iters=iters,
                **_compile(radix_histogram.radix_histogram_kernel, pointers, constexprs, arch))


def compile_fisher_variant(arch: int, grad_dtype: str, block: int, iters: int) -> dict:
    """The in-place Fisher accumulation kernel (fp32 scores, ``grad_dtype`` gradients)."""
    g_type = TRITON_TYPES[grad_dtype]
    pointers = {"f_base": "*fp32", "g_base": f"*{g_type}", "scale_base": "*fp32", "table": "*i64",
                "chunk_tensor": "*i32", "chunk_start": "*i64"}
    constexprs = dict(F_ALIGN=4, G_ALIGN=16 // {"fp32": 4, "bf16": 2, "fp16": 2}[g_type], BLOCK=block, ITERS=iters)
    return dict(kernel="fisher_accumulate", arch=arch, grad_dtype=grad_dtype, block=block, iters=iters,
                **_compile(fisher_accumulate.fisher_accumulate_kernel, pointers, constexprs, arch))


def _resource_usage(ptx: str) -> dict:
    """Registers, stack and spill bytes per thread, from Triton's own ptxas (it reads Triton's PTX)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        target = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)  # sm_90a for arch 90
        out = subprocess.run([tool, "-v", "--gpu-name", target, f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return dict(registers=int(re.search(r"Used (\d+) registers", out).group(1)), stack=int(frame.group(1)),
                spill_stores=int(frame.group(2)), spill_loads=int(frame.group(3)))


def _rows(args):
    """The variants ``main`` prints, compiled one at a time."""
    kernels = args.kernel or KERNELS
    iters = args.iters or multi_tensor.DEFAULT_ITERS
    if "masked_adamw" in kernels:
        for dtype, kind, freeze, amsgrad in itertools.product(("float32", "bfloat16"), (0, 1, 2), (False, True),
                                                              (False, True)):
            if not (kind == 0 and freeze):
                yield compile_variant(args.arch, dtype, kind, freeze, amsgrad, args.block, iters)
    if "sparse_adamw" in kernels:
        for dtype, compact, amsgrad in itertools.product(("float32", "bfloat16"), (False, True), (False, True)):
            yield compile_sparse_variant(args.arch, dtype, compact, amsgrad, args.block, iters)
    if "radix_histogram" in kernels:
        for bits, check_prefix in ((11, False), (11, True), (10, True)):
            yield compile_histogram_variant(args.arch, bits, check_prefix, args.block,
                                            args.iters or radix_histogram.DEFAULT_ITERS)
    if "fisher_accumulate" in kernels:
        for dtype in ("float32", "bfloat16"):
            yield compile_fisher_variant(args.arch, dtype, args.block, iters)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--block", type=int, default=multi_tensor.DEFAULT_BLOCK)
    parser.add_argument("--iters", type=int, help="blocks per program (default: each kernel's launch default)")
    parser.add_argument("--kernel", action="append", choices=KERNELS, help="only these kernels (repeatable)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: this tool compiles the kernel")
    for row in _rows(args):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
