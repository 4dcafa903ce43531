"""The optimizer-step rows of ``python -m childopt bench``: one ``opt.step()`` of torch AdamW, the
childopt optimizers, bitsandbytes' 8-bit AdamW and the published ChildTuning loop, timed alike.

Every row steps a fresh copy of the same parameter list (roberta-base shapes, shrunk on CPU and
for ``--quick``) whose gradients are fixed random tensors set once, so only ``opt.step()`` is
timed: a few untimed warm-up steps (the first Triton step compiles), then the median wall time
of the timed steps, with a device synchronize after each step on CUDA.

An optimizer step is memory-bound, so each row also carries a byte model (the bytes the step
has to move per element) and turns it into achieved GB/s, compared with the bandwidth of a plain
``dst.copy_(src)`` of the same size measured in the same run.
"""
from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from tqdm import tqdm

from childopt import ChildTuningAdamW, MaskedAdamW
from childopt.bench.baselines import ChildTuningReferenceAdamW, adamw_8bit, fused_adamw
from childopt.bench.measure import (Unavailable, peak_memory_gb, reset_peak_memory, skip_record, state_gb,
                                    synchronized, time_calls)
from childopt.bench.shapes import make_params
from childopt.bench.table import aligned_table

# (device type, --quick) -> (roberta_base_shapes scale, layers, timed steps).  CPU sizes keep the
# quick run under ~3 minutes and the full one under ~10 on two cores; CUDA uses roberta-base.
SIZES = {
    ("cpu", True): (1 / 3, 4, 5),
    ("cpu", False): (0.5, 8, 10),
    ("cuda", True): (1.0, 4, 20),
    ("cuda", False): (1.0, None, 50),
}

HYPER = dict(lr=1e-3, weight_decay=1e-2)
DENSITY = 0.3
RESERVE_P = 0.3

# Byte model, per parameter element and step, fp32.  An AdamW step reads p, g, m, v (16 B) and
# writes p, m, v (12 B); a dense mask adds a 1-byte read; the in-kernel Bernoulli mask adds
# nothing.  Every row is charged what its update needs, not what its implementation moves
# (torch's foreach AdamW moves ~80 B, the ChildTuning loop well over 100 B), so GB/s is an
# effective bandwidth, comparable across rows and with the copy bandwidth.
ADAMW_BYTES = 28
MASK_BYTES = 1
# bitsandbytes' 8-bit AdamW: p read + write 8, g 4, m and v one byte each read + written 4 (its
# per-block scales are under 1%).
ADAMW_8BIT_BYTES = 16
# Sparse storage moves idx 4 + g 4 + p 4 + 4 + m 8 + v 8 = 32 B per *selected* entry.
SPARSE_ENTRY_BYTES = 32
SPARSE_DENSITIES = (0.01, 0.05, 0.1, 0.3)


def _dense_mask(params, density: float = DENSITY) -> dict:
    """A random child network keeping a ``density`` fraction of every parameter."""
    return {p: torch.rand(p.shape, device=p.device) < density for p in params}


def _sparse_row(density: float) -> "RowSpec":
    """MaskedAdamW with sparse-index storage of a random child network of ``density``."""
    return RowSpec(f"masked-sparse-{density}", "MaskedAdamW", f"sparse {density}", SPARSE_ENTRY_BYTES * density,
                   lambda ps, backend: MaskedAdamW(ps, mask=_dense_mask(ps, density), storage="sparse",
                                                   backend=backend, **HYPER))


@dataclass(frozen=True)
class RowSpec:
    """One benchmark row: how to build its optimizer over a parameter list, and its byte model.

    ``make(params, backend)`` builds the optimizer, or raises :class:`Unavailable` (the row is
    then skipped with the reason); ``backend`` is the label of rows that do not run on a childopt
    backend (childopt optimizers report theirs).  ``scales_grads`` marks optimizers that
    multiply the gradient in place (the published ChildTuning loop): their gradients are restored
    between timed steps, outside the timer, so repeated steps never reach inf.
    """

    key: str
    optimizer: str
    mode: str
    bytes_per_element: float
    make: Callable[[list, str], torch.optim.Optimizer]
    backend: Optional[str] = None
    scales_grads: bool = False
    compiled: bool = False


def _compiled(spec: RowSpec) -> RowSpec:
    """``spec`` with its ``opt.step`` under ``torch.compile`` (warm-up steps absorb the compiles)."""
    return dataclasses.replace(spec, key=f"{spec.key}-compiled", mode=f"{spec.mode}, compiled", compiled=True)


ROWS = (
    RowSpec("adamw-foreach", "torch AdamW", "foreach", ADAMW_BYTES,
            lambda ps, backend: torch.optim.AdamW(ps, foreach=True, **HYPER), backend="torch"),
    RowSpec("adamw-fused", "torch AdamW", "fused", ADAMW_BYTES,
            lambda ps, backend: fused_adamw(ps, **HYPER), backend="torch"),
    RowSpec("adamw-8bit", "bitsandbytes AdamW8bit", "8-bit state", ADAMW_8BIT_BYTES,
            lambda ps, backend: adamw_8bit(ps, **HYPER), backend="bitsandbytes"),
    RowSpec("masked-none", "MaskedAdamW", "mask=None", ADAMW_BYTES,
            lambda ps, backend: MaskedAdamW(ps, backend=backend, **HYPER)),
    RowSpec("masked-dense-freeze", "MaskedAdamW", f"dense {DENSITY} freeze", ADAMW_BYTES + MASK_BYTES,
            lambda ps, backend: MaskedAdamW(ps, mask=_dense_mask(ps), masked="freeze", backend=backend, **HYPER)),
    RowSpec("masked-dense-zero_grad", "MaskedAdamW", f"dense {DENSITY} zero_grad", ADAMW_BYTES + MASK_BYTES,
            lambda ps, backend: MaskedAdamW(ps, mask=_dense_mask(ps), masked="zero_grad", backend=backend, **HYPER)),
    RowSpec("masked-bernoulli", "MaskedAdamW", f"bernoulli p={RESERVE_P}", ADAMW_BYTES,
            lambda ps, backend: MaskedAdamW(ps, mask="bernoulli", reserve_p=RESERVE_P, seed=0, backend=backend,
                                            **HYPER)),
    RowSpec("childtuning-f", "ChildTuningAdamW", f"ChildTuning-F p={RESERVE_P}", ADAMW_BYTES,
            lambda ps, backend: ChildTuningAdamW(ps, mode="ChildTuning-F", reserve_p=RESERVE_P, seed=0,
                                                 backend=backend, **HYPER)),
    RowSpec("childtuning-f-loop", "ChildTuningReferenceAdamW", f"ChildTuning-F p={RESERVE_P}", ADAMW_BYTES,
            lambda ps, backend: ChildTuningReferenceAdamW(ps, mode="ChildTuning-F", reserve_p=RESERVE_P, **HYPER),
            backend="python loop", scales_grads=True),
    *(_sparse_row(density) for density in SPARSE_DENSITIES),
)
# Eager against compiled: torch's recommended compiled AdamW and the same childopt rows compiled.
ROWS += tuple(_compiled(spec) for spec in ROWS if spec.key in ("adamw-foreach", "masked-none", "masked-bernoulli"))


@dataclass(frozen=True)
class Row:
    """The measurements of one row (``pct_copy_bw`` and ``x_fused`` are set by :func:`compare`)."""

    key: str
    optimizer: str
    mode: str
    backend: str
    it_s: float
    ms_per_step: float
    peak_gb: float
    state_gb: float
    bytes_per_step: int
    gbps: float
    numel: int
    steps: int
    pct_copy_bw: Optional[float] = None
    x_fused: Optional[float] = None


def _grad_restorer(params) -> Callable[[], None]:
    """A callable that puts back the gradients ``params`` have now (for optimizers that scale them)."""
    saved = [p.grad.clone() for p in params]

    def restore() -> None:
        for p, g in zip(params, saved):
            p.grad.copy_(g)

    return restore


def measure_row(spec: RowSpec, opt: torch.optim.Optimizer, params, device: torch.device, *,
                warmup: int, steps: int) -> Row:
    """Warm up, then time ``steps`` calls of ``opt.step()`` over ``params`` and apply the byte model."""
    step = synchronized(torch.compile(opt.step) if spec.compiled else opt.step, device)
    restore = _grad_restorer(params) if spec.scales_grads else None
    for _ in range(warmup):
        if restore is not None:
            restore()
        step()
    reset_peak_memory(device)
    seconds = statistics.median(time_calls(step, steps, before=restore))
    numel = sum(p.numel() for p in params)
    bytes_per_step = round(spec.bytes_per_element * numel)
    backend = spec.backend or opt.backend_name()
    return Row(key=spec.key, optimizer=spec.optimizer, mode=spec.mode, backend=backend, it_s=1.0 / seconds,
               ms_per_step=seconds * 1e3, peak_gb=peak_memory_gb(device), state_gb=state_gb(opt),
               bytes_per_step=bytes_per_step, gbps=bytes_per_step / seconds / 1e9, numel=numel, steps=steps)


def run_row(spec: RowSpec, shapes, device: torch.device, *, warmup: int, steps: int, backend: str = "auto") -> Row:
    """Build ``spec``'s optimizer over fresh parameters and measure it; everything is freed on return."""
    params = make_params(shapes, device)
    opt = spec.make(params, backend)
    return measure_row(spec, opt, params, device, warmup=warmup, steps=steps)


def compare(rows: list[Row], copy_gbps: float) -> tuple[list[Row], str]:
    """Rows with % of copy bandwidth and speed relative to torch fused AdamW (foreach when fused is missing)."""
    baselines = {(r.optimizer, r.mode): r for r in rows}
    baseline = baselines.get(("torch AdamW", "fused")) or baselines[("torch AdamW", "foreach")]
    compared = [dataclasses.replace(r, pct_copy_bw=100.0 * r.gbps / copy_gbps, x_fused=r.it_s / baseline.it_s)
                for r in rows]
    return compared, f"torch-{baseline.mode}"


def format_table(rows: list[Row], baseline: str) -> str:
    """The step rows as an aligned text table."""
    columns = (
        ("optimizer", lambda r: r.optimizer), ("mode", lambda r: r.mode), ("backend", lambda r: r.backend),
        ("it/s", lambda r: f"{r.it_s:.2f}"), ("ms/step", lambda r: f"{r.ms_per_step:.2f}"),
        ("peak GB", lambda r: f"{r.peak_gb:.3f}"), ("state GB", lambda r: f"{r.state_gb:.3f}"),
        ("GB/s", lambda r: f"{r.gbps:.1f}"), ("% copy BW", lambda r: f"{r.pct_copy_bw:.0f}%"),
        (f"x {baseline}", lambda r: f"{r.x_fused:.2f}x"),
    )
    return aligned_table(columns, rows, numeric=range(3, len(columns)))


def run_rows(shapes, device: torch.device, *, warmup: int, steps: int,
             backend: str = "auto") -> tuple[list[Row], list[dict]]:
    """Measure every row of ``ROWS`` under a progress bar; rows that cannot run here are skipped with the reason."""
    rows, skipped = [], []
    for spec in tqdm(ROWS, desc="bench", unit="row"):
        try:
            rows.append(run_row(spec, shapes, device, warmup=warmup, steps=steps, backend=backend))
        except Unavailable as exc:
            skipped.append(skip_record(spec.key, spec.optimizer, spec.mode, str(exc)))
    return rows, skipped
