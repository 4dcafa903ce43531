"""The optimizer-step rows of ``python -m childopt bench``: one ``opt.step()`` of torch AdamW, the
childopt optimizers, bitsandbytes' 8-bit AdamW and the published ChildTuning loop, timed alike.

Every row steps a fresh copy of the same parameter list (roberta-base shapes: 24.3M or 125M
elements, fp32 or bf16 parameters and gradients) whose gradients are fixed random tensors set
once, so only ``opt.step()`` is timed: a few untimed warm-up steps (the first Triton step
compiles), then the median wall time of the timed steps, with a device synchronize after each
step on CUDA.  Each timed step starts with the last-level cache evicted, untimed, as training's
forward and backward leave it (:mod:`childopt.bench.evict`): back to back, a step whose data fits
the cache (sparse storage at 1%) would be timed warm.

An optimizer step is memory-bound, so each row also carries a byte model (the bytes the step has
to move per element, from the parameter dtype and the state dtype the optimizer keeps) and turns
it into achieved GB/s, compared with the in-place stream reference of :mod:`childopt.bench.stream`
measured in the same run at the same thread count.  On CPU each row also gets its in-cache time
(:mod:`childopt.bench.ceiling`): what its step costs with its data in cache.  The rows of one
size, dtype and thread count form a :class:`Table`.
"""
from __future__ import annotations

import dataclasses
import statistics
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from tqdm import tqdm

from childopt import ChildTuningAdamW, Importance, MaskedAdamW
from childopt.bench.baselines import ChildTuningReferenceAdamW, adamw_8bit, fused_adamw
from childopt.bench.ceiling import measure_compute
from childopt.bench.evict import CacheEvictor
from childopt.bench.measure import (Unavailable, grad_restorer, peak_memory_gb, reset_peak_memory, skip_record,
                                    state_gb, synchronized, time_calls)
from childopt.bench.shapes import make_params, roberta_base_shapes
from childopt.bench.stream import StreamReference
from childopt.bench.table import aligned_table
from childopt.bench.threads import label

# --size -> roberta_base_shapes(scale, layers): 24.3M elements in 139 tensors (the CPU default:
# parameters, gradients and moments hold 390 MB) and roberta-base's 125M in 203 (2 GB).
SIZES = {"24m": (0.5, 8), "125m": (1.0, None)}
DEFAULT_SIZE = {"cpu": "24m", "cuda": "125m"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# (device type, --quick) -> timed steps per row.
STEPS = {("cpu", True): 5, ("cpu", False): 10, ("cuda", True): 20, ("cuda", False): 50}

HYPER = dict(lr=1e-3, weight_decay=1e-2)
DENSITY = 0.3
RESERVE_P = 0.3
REFRESH = 100  # steps between two solves of the importance mask (Importance's default)

# Byte model, per parameter element and step.  An AdamW step reads p and g and writes p in the
# parameter dtype (3 x its size: 12 B in fp32, 6 in bf16) and reads and writes m and v in the
# state dtype (4 x its size: torch keeps the parameter's dtype, childopt fp32, bitsandbytes one
# byte), so 28 B per fp32 element; a dense mask adds a 1-byte read; the in-kernel Bernoulli mask
# adds nothing; the importance mask's level code is a 1-byte read, like the dense mask (its
# refreshes are charged nothing: their time shows in the row's speed).  Every row is charged what its update needs, not what its implementation moves
# (torch's foreach AdamW moves ~80 B, the ChildTuning loop well over 100 B), so GB/s is an
# effective bandwidth, comparable across rows and with the stream reference.
FP32 = 4
MASK_BYTES = 1
# Sparse storage moves an int32 index, g read, p read and written and fp32 m and v read and
# written per *selected* entry: 32 B in fp32.
INDEX_BYTES = 4
SPARSE_DENSITIES = (0.01, 0.05, 0.1, 0.3)


def adamw_traffic(state_size: Optional[int] = None, extra: float = 0) -> Callable[[int], float]:
    """Bytes per element of an AdamW step as a function of the parameter's element size: p, g and
    p again in that size, m and v twice each in ``state_size`` (the parameter's when None), plus ``extra``."""
    return lambda param_size: 3 * param_size + 4 * (state_size or param_size) + extra


def sparse_traffic(density: float) -> Callable[[int], float]:
    """Bytes per parameter element of a sparse-storage step selecting ``density`` of the entries."""
    return lambda param_size: density * (INDEX_BYTES + 3 * param_size + 4 * FP32)


def _dense_mask(params, density: float = DENSITY) -> dict:
    """A random child network keeping a ``density`` fraction of every parameter."""
    return {p: torch.rand(p.shape, device=p.device) < density for p in params}


def _positive_scores(params) -> dict:
    """Random importance scores in [1, 2): every entry can be drawn.  (Running scores under an
    exact draw are zero for the entries never kept, so every draw would repeat the first.)"""
    return {p: torch.rand(p.shape, device=p.device).add_(1.0) for p in params}


def _sparse_compact(params, density: float, backend: str) -> MaskedAdamW:
    """MaskedAdamW with sparse-index storage of a random child network of ``density`` and compact
    gradients.  The parameters' gradients pass once through backward, so the optimizer's hooks
    turn each into its compact buffer as in training; every timed step then reads those."""
    grads = [p.grad for p in params]
    opt = MaskedAdamW(params, mask=_dense_mask(params, density), storage="sparse", compact_grads=True,
                      backend=backend, **HYPER)
    for p in params:
        p.grad = None
    torch.autograd.backward(params, grads)
    return opt


def _sparse_row(density: float) -> "RowSpec":
    """Sparse-index storage of a random child network of ``density``, compact gradients."""
    return RowSpec(f"masked-sparse-{density}", "MaskedAdamW", f"sparse {density}, compact grads",
                   sparse_traffic(density), lambda ps, backend: _sparse_compact(ps, density, backend))


@dataclass(frozen=True)
class RowSpec:
    """One benchmark row: how to build its optimizer over a parameter list, and its byte model
    (``bytes_per_element(parameter element size)``).

    ``make(params, backend)`` builds the optimizer, or raises :class:`Unavailable` (the row is
    then skipped with the reason); ``backend`` is the label of rows that do not run on a childopt
    backend (childopt optimizers report theirs).  ``scales_grads`` marks optimizers that
    multiply the gradient in place (the published ChildTuning loop): their gradients are restored
    between timed steps, outside the timer, so repeated steps never reach inf.
    """

    key: str
    optimizer: str
    mode: str
    bytes_per_element: Callable[[int], float]
    make: Callable[[list, str], torch.optim.Optimizer]
    backend: Optional[str] = None
    scales_grads: bool = False
    compiled: bool = False


def _compiled(spec: RowSpec) -> RowSpec:
    """``spec`` with its ``opt.step`` under ``torch.compile`` (warm-up steps absorb the compiles)."""
    return dataclasses.replace(spec, key=f"{spec.key}-compiled", mode=f"{spec.mode}, compiled", compiled=True)


ROWS = (
    RowSpec("adamw-foreach", "torch AdamW", "foreach", adamw_traffic(),
            lambda ps, backend: torch.optim.AdamW(ps, foreach=True, **HYPER), backend="torch"),
    RowSpec("adamw-fused", "torch AdamW", "fused", adamw_traffic(),
            lambda ps, backend: fused_adamw(ps, **HYPER), backend="torch"),
    RowSpec("adamw-8bit", "bitsandbytes AdamW8bit", "8-bit state", adamw_traffic(1),
            lambda ps, backend: adamw_8bit(ps, **HYPER), backend="bitsandbytes"),
    RowSpec("masked-none", "MaskedAdamW", "mask=None", adamw_traffic(FP32),
            lambda ps, backend: MaskedAdamW(ps, backend=backend, **HYPER)),
    RowSpec("masked-dense-freeze", "MaskedAdamW", f"dense {DENSITY} freeze", adamw_traffic(FP32, MASK_BYTES),
            lambda ps, backend: MaskedAdamW(ps, mask=_dense_mask(ps), masked="freeze", backend=backend, **HYPER)),
    RowSpec("masked-dense-zero_grad", "MaskedAdamW", f"dense {DENSITY} zero_grad", adamw_traffic(FP32, MASK_BYTES),
            lambda ps, backend: MaskedAdamW(ps, mask=_dense_mask(ps), masked="zero_grad", backend=backend, **HYPER)),
    RowSpec("masked-bernoulli", "MaskedAdamW", f"bernoulli p={RESERVE_P}", adamw_traffic(FP32),
            lambda ps, backend: MaskedAdamW(ps, mask="bernoulli", reserve_p=RESERVE_P, seed=0, backend=backend,
                                            **HYPER)),
    RowSpec("masked-importance", "MaskedAdamW", f"importance p={RESERVE_P}, running, refresh {REFRESH}",
            adamw_traffic(FP32, MASK_BYTES),
            lambda ps, backend: MaskedAdamW(ps, mask=Importance(refresh_every=REFRESH), reserve_p=RESERVE_P, seed=0,
                                            backend=backend, **HYPER)),
    # The rows report the median step, which a refresh every 100 steps does not touch: this row
    # refreshes at every step, so the two give a refresh's cost (and any refresh interval's mean).
    RowSpec("masked-importance-refresh-1", "MaskedAdamW", f"importance p={RESERVE_P}, running, refresh 1",
            adamw_traffic(FP32, MASK_BYTES),
            lambda ps, backend: MaskedAdamW(ps, mask=Importance(refresh_every=1), reserve_p=RESERVE_P, seed=0,
                                            backend=backend, **HYPER)),
    RowSpec("masked-importance-exact", "MaskedAdamW", f"importance p={RESERVE_P}, exact, given scores, redrawn "
            "every step", adamw_traffic(FP32, MASK_BYTES),
            lambda ps, backend: MaskedAdamW(ps, mask=Importance(scores=_positive_scores(ps), sampling="exact",
                                                                refresh_every=1),
                                            reserve_p=RESERVE_P, seed=0, backend=backend, **HYPER)),
    RowSpec("childtuning-f", "ChildTuningAdamW", f"ChildTuning-F p={RESERVE_P}", adamw_traffic(FP32),
            lambda ps, backend: ChildTuningAdamW(ps, mode="ChildTuning-F", reserve_p=RESERVE_P, seed=0,
                                                 backend=backend, **HYPER)),
    RowSpec("childtuning-f-loop", "ChildTuningReferenceAdamW", f"ChildTuning-F p={RESERVE_P}", adamw_traffic(),
            lambda ps, backend: ChildTuningReferenceAdamW(ps, mode="ChildTuning-F", reserve_p=RESERVE_P, **HYPER),
            backend="python loop", scales_grads=True),
    *(_sparse_row(density) for density in SPARSE_DENSITIES),
)
# Eager against compiled: torch's recommended compiled AdamW and the same childopt rows compiled.
ROWS += tuple(_compiled(spec) for spec in ROWS if spec.key in ("adamw-foreach", "masked-none", "masked-bernoulli"))


@dataclass(frozen=True)
class Row:
    """The measurements of one row (``pct_stream`` and ``x_fused`` are set by :func:`compare`;
    ``compute_*``, the in-cache time of :mod:`childopt.bench.ceiling`, on CPU by :func:`run_row`)."""

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
    dtype: str
    threads: int
    pct_stream: Optional[float] = None
    x_fused: Optional[float] = None
    compute_ns_per_element: Optional[float] = None
    compute_ms: Optional[float] = None


def dtype_name(dtype: torch.dtype) -> str:
    """"float32" for ``torch.float32``: how rows, tables and ``--dtype`` name a dtype."""
    return str(dtype).removeprefix("torch.")


def before_timed(restore: Optional[Callable[[], None]], evictor: Optional[CacheEvictor]) -> Callable[[], None]:
    """What runs, untimed, ahead of each timed step: put back the gradients a row scales in place
    (``restore``), then evict the last-level cache (``evictor``; last, as restoring the gradients
    brings them into the cache).  Either may be None."""
    def before() -> None:
        if restore is not None:
            restore()
        if evictor is not None:
            evictor()

    return before


def measure_row(spec: RowSpec, opt: torch.optim.Optimizer, params, device: torch.device, *,
                warmup: int, steps: int, evictor: Optional[CacheEvictor] = None) -> Row:
    """Warm up, then time ``steps`` calls of ``opt.step()`` over ``params`` at the current intra-op
    thread count and apply the byte model of the parameters' dtype.  With ``evictor``, each timed
    step starts with the last-level cache evicted, as in training (:mod:`childopt.bench.evict`);
    the peak memory then leaves out the evictor's buffer, live through the whole window (where
    the window could be started)."""
    step = synchronized(torch.compile(opt.step) if spec.compiled else opt.step, device)
    restore = grad_restorer(params) if spec.scales_grads else None
    for _ in range(warmup):
        if restore is not None:
            restore()
        step()
    windowed = reset_peak_memory(device)
    seconds = statistics.median(time_calls(step, steps, before=before_timed(restore, evictor)))
    # a peak counted from process start may predate the buffer: left whole, it stays an upper bound
    peak_gb = peak_memory_gb(device) - (evictor.nbytes / 1e9 if evictor is not None and windowed else 0.0)
    numel = sum(p.numel() for p in params)
    bytes_per_step = round(spec.bytes_per_element(params[0].element_size()) * numel)
    backend = spec.backend or opt.backend_name()
    return Row(key=spec.key, optimizer=spec.optimizer, mode=spec.mode, backend=backend, it_s=1.0 / seconds,
               ms_per_step=seconds * 1e3, peak_gb=peak_gb, state_gb=state_gb(opt),
               bytes_per_step=bytes_per_step, gbps=bytes_per_step / seconds / 1e9, numel=numel, steps=steps,
               dtype=dtype_name(params[0].dtype), threads=torch.get_num_threads())


def run_row(spec: RowSpec, shapes, device: torch.device, *, warmup: int, steps: int, backend: str = "auto",
            dtype: torch.dtype = torch.float32, cache_bytes: Optional[int] = None,
            evictor: Optional[CacheEvictor] = None) -> Row:
    """Build ``spec``'s optimizer over fresh ``dtype`` parameters and measure it; everything is freed on return.

    With ``cache_bytes`` (one last-level cache instance) on CPU, the row also gets its in-cache time
    (:mod:`childopt.bench.ceiling`), except compiled rows (two more list shapes would compile the
    step twice more).  A failure there warns and leaves the measured row without it.
    """
    params = make_params(shapes, device, dtype=dtype)
    opt = spec.make(params, backend)
    row = measure_row(spec, opt, params, device, warmup=warmup, steps=steps, evictor=evictor)
    del params, opt
    if cache_bytes is None or device.type != "cpu" or spec.compiled:
        return row
    try:
        ns_per_element = measure_compute(lambda ps: spec.make(ps, backend), dtype, cache_bytes,
                                         restore_grads=spec.scales_grads)
    except (RuntimeError, TypeError, NotImplementedError) as exc:  # Unavailable is a RuntimeError
        warnings.warn(f"{spec.key}: no in-cache time: {type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)
        return row
    return dataclasses.replace(row, compute_ns_per_element=ns_per_element,
                               compute_ms=None if ns_per_element is None else ns_per_element * row.numel / 1e6)


def compare(rows: list[Row], stream_gbps: float) -> tuple[list[Row], str]:
    """Rows with their GB/s as % of the stream reference's and their speed relative to torch fused
    AdamW of the same rows (foreach when fused is missing)."""
    by_key = {r.key: r for r in rows}
    baseline = by_key.get("adamw-fused") or by_key["adamw-foreach"]
    compared = [dataclasses.replace(r, pct_stream=100.0 * r.gbps / stream_gbps, x_fused=r.it_s / baseline.it_s)
                for r in rows]
    return compared, baseline.key.replace("adamw", "torch")


def format_table(rows: list[Row], baseline: str) -> str:
    """The step rows as an aligned text table."""
    columns = (
        ("optimizer", lambda r: r.optimizer), ("mode", lambda r: r.mode), ("backend", lambda r: r.backend),
        ("it/s", lambda r: f"{r.it_s:.2f}"), ("ms/step", lambda r: f"{r.ms_per_step:.2f}"),
        ("peak GB", lambda r: f"{r.peak_gb:.3f}"), ("state GB", lambda r: f"{r.state_gb:.3f}"),
        ("GB/s", lambda r: f"{r.gbps:.1f}"), ("% of stream", lambda r: f"{r.pct_stream:.0f}%"),
        ("compute ms", lambda r: "-" if r.compute_ms is None else f"{r.compute_ms:.2f}"),
        (f"x {baseline}", lambda r: f"{r.x_fused:.2f}x"),
    )
    if all(r.compute_ms is None for r in rows):  # CUDA, or no cache size: no column of dashes
        columns = tuple(c for c in columns if c[0] != "compute ms")
    return aligned_table(columns, rows, numeric=range(3, len(columns)))


def run_rows(shapes, device: torch.device, *, warmup: int, steps: int, backend: str = "auto",
             dtype: torch.dtype = torch.float32, cache_bytes: Optional[int] = None,
             evictor: Optional[CacheEvictor] = None) -> tuple[list[Row], list[dict]]:
    """Measure every row of ``ROWS`` under a progress bar (with in-cache times given ``cache_bytes``
    and the cache evicted ahead of each timed step given ``evictor``, :func:`run_row`); rows that
    cannot run here are skipped with the reason, and so are rows whose optimizer fails on non-fp32
    parameters."""
    rows, skipped = [], []
    for spec in tqdm(ROWS, desc=f"bench {dtype_name(dtype)}, {label(torch.get_num_threads(), 0)}", unit="row"):
        try:
            rows.append(run_row(spec, shapes, device, warmup=warmup, steps=steps, backend=backend, dtype=dtype,
                                cache_bytes=cache_bytes, evictor=evictor))
        except ROW_FAILURES as exc:
            skipped.append(skip_for(spec, dtype, exc))
    return rows, skipped


# What building or stepping a row may raise: Unavailable (a RuntimeError) and the errors of an
# optimizer that does not take these parameters.
ROW_FAILURES = (RuntimeError, TypeError, NotImplementedError)


def skip_for(spec: RowSpec, dtype: torch.dtype, exc: Exception) -> dict:
    """The skip record of a row that raised ``exc`` (one of :data:`ROW_FAILURES`): a row that cannot
    run here is skipped with the reason, and so is one whose optimizer fails on non-fp32 parameters;
    any other fp32 failure is a bug and is raised again."""
    if isinstance(exc, Unavailable):
        return skip_record(spec.key, spec.optimizer, spec.mode, str(exc))
    if dtype == torch.float32:
        raise exc
    return skip_record(spec.key, spec.optimizer, spec.mode,
                       f"fails with {dtype_name(dtype)} parameters: {type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class Table:
    """The rows of one parameter list (``size``, a key of :data:`SIZES`), dtype and intra-op thread
    count, compared with the stream reference measured at that thread count (``baseline``: the row
    the speed ratios divide by)."""

    size: str
    dtype: str
    threads: int
    stream: StreamReference
    rows: list[Row]
    skipped: list[dict]
    baseline: str
    other_cpu: Optional[float] = None  # CPU share other processes took meanwhile (childopt.bench.contention)


def run_table(size: str, dtype: torch.dtype, stream: StreamReference, device: torch.device, *, warmup: int,
              steps: int, backend: str = "auto") -> Table:
    """Every row over the ``size`` list of ``dtype`` parameters at the current thread count, each timed
    step starting with the last-level cache (the size ``stream`` was chosen from) evicted, compared
    with ``stream``."""
    scale, layers = SIZES[size]
    # an assumed cache size could put the in-cache lists in memory: no in-cache time then
    rows, skipped = run_rows(roberta_base_shapes(scale, layers), device, warmup=warmup, steps=steps, backend=backend,
                             dtype=dtype, cache_bytes=stream.llc_instance_bytes if stream.llc_known else None,
                             evictor=CacheEvictor(device, stream.llc_bytes))
    rows, baseline = compare(rows, stream.gbps)
    return Table(size, dtype_name(dtype), torch.get_num_threads(), stream, rows, skipped, baseline)
