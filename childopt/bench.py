"""The optimizer-step benchmark of ``python -m childopt bench``, and the measuring helpers every
benchmark shares (timing, peak memory, copy bandwidth, environment, tables).

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
import datetime
import gc
import importlib.util
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Optional

import torch
from tqdm import tqdm

from childopt import ChildTuningAdamW, MaskedAdamW
from childopt.baselines import ChildTuningReferenceAdamW

WARMUP = 3
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


def roberta_base_shapes(scale: float = 1.0, layers: Optional[int] = None) -> list[tuple[int, ...]]:
    """Parameter shapes of roberta-base with a sequence-classification head (~125M elements).

    ``scale`` shrinks the hidden size (rounded to a multiple of 64; the intermediate size stays
    4x hidden), the vocabulary and, unless ``layers`` is given, the number of layers, so smaller
    machines time the same mix of one huge embedding, square matrices and many tiny vectors.
    """
    hidden = 64 * max(1, round(768 * scale / 64))
    intermediate = 4 * hidden
    vocab = max(1, round(50265 * scale))
    layers = max(1, round(12 * scale)) if layers is None else layers
    shapes = [(vocab, hidden), (514, hidden), (1, hidden), (hidden,), (hidden,)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (hidden,)] * 4          # query, key, value, attention output
        shapes += [(hidden,), (hidden,)]                      # attention LayerNorm
        shapes += [(intermediate, hidden), (intermediate,)]   # intermediate dense
        shapes += [(hidden, intermediate), (hidden,)]         # output dense
        shapes += [(hidden,), (hidden,)]                      # output LayerNorm
    shapes += [(hidden, hidden), (hidden,)]                   # pooler
    shapes += [(hidden, hidden), (hidden,), (2, hidden), (2,)]  # classifier dense and projection
    return shapes


def decoder_1b_shapes() -> list[tuple[int, ...]]:
    """A 1.26B-parameter LLaMA-style decoder: hidden 2048, 22 layers, SwiGLU 5632, vocab 32000, untied head."""
    hidden, intermediate, vocab, layers = 2048, 5632, 32000, 22
    shapes = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)] + [(hidden,)] * 2
    return shapes + [(hidden,), (vocab, hidden)]


def many_tiny_shapes(count: int = 2000) -> list[tuple[int, ...]]:
    """``count`` tensors of 16 to 1024 elements: launch and host overhead, not bandwidth."""
    return [(16 * (1 + i % 64),) for i in range(count)]


def make_params(shapes, device: torch.device, seed: int = 0) -> list[torch.nn.Parameter]:
    """fp32 parameters of ``shapes`` with random gradients set once; seeded, so every row sees the same data."""
    torch.manual_seed(seed)
    params = []
    for shape in shapes:
        param = torch.nn.Parameter(torch.randn(shape, device=device))
        param.grad = torch.randn(shape, device=device)
        params.append(param)
    return params


def _dense_mask(params, density: float = DENSITY) -> dict:
    """A random child network keeping a ``density`` fraction of every parameter."""
    return {p: torch.rand(p.shape, device=p.device) < density for p in params}


class Unavailable(RuntimeError):
    """A row that cannot run here (a package or a GPU is missing); the message says which."""


def skip_record(key: str, optimizer: str, mode: str, reason: str) -> dict:
    """How a skipped row appears in the report and its JSON."""
    return {"key": key, "optimizer": optimizer, "mode": mode, "reason": reason}


def fused_adamw(params, **hyper) -> torch.optim.Optimizer:
    """torch's fused AdamW, or :class:`Unavailable` where this torch has no fused kernel for the device."""
    try:
        return torch.optim.AdamW(params, fused=True, **hyper)
    except RuntimeError as exc:
        raise Unavailable(f"torch.optim.AdamW(fused=True): {exc}") from exc


def adamw_8bit(params, **hyper) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit AdamW over ``params`` (a list), or :class:`Unavailable` saying what it needs."""
    if importlib.util.find_spec("bitsandbytes") is None or params[0].device.type != "cuda":
        raise Unavailable("bitsandbytes 8-bit AdamW needs the bitsandbytes package and a CUDA GPU")
    import bitsandbytes

    return bitsandbytes.optim.AdamW8bit(params, **hyper)


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


def synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """``fn`` followed, on CUDA, by a synchronize, so a call's wall time covers its kernels."""
    if device.type != "cuda":
        return fn

    def call():
        fn()
        torch.cuda.synchronize(device)

    return call


def time_calls(fn: Callable[[], object], steps: int, before: Optional[Callable[[], object]] = None) -> list[float]:
    """Wall seconds of each of ``steps`` calls of a synchronized ``fn``; ``before`` runs untimed ahead of each."""
    times = []
    for _ in range(steps):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak-memory window; False where the CPU peak RSS cannot be reset.

    Garbage of earlier rows (objects in reference cycles) is collected first, so it is not
    counted.  On CUDA the window starts from the memory allocated now.  On Linux writing 5 to
    /proc/self/clear_refs resets the RSS high-water mark that ``ru_maxrss`` reports to the
    current RSS, which still holds heap the allocator kept from earlier rows; elsewhere the CPU
    peak counts from process start.  CPU peaks are therefore upper bounds.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory since :func:`reset_peak_memory`: CUDA allocated bytes, or the process peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    rss_unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * rss_unit / 1e9


def state_gb(opt: torch.optim.Optimizer) -> float:
    """GB held by the tensors of ``opt.state`` (moments, masks, step counters)."""
    return sum(v.nbytes for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)) / 1e9


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
    step = synchronized(opt.step, device)
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


def measure_copy_gbps(numel: int, device: torch.device, *, warmup: int, steps: int) -> float:
    """Bandwidth of ``dst.copy_(src)`` on fp32 buffers of ``numel`` elements (read 4 B + write 4 B each).

    On CPUs the write to ``dst`` also reads its cache lines first (write-allocate), traffic the
    8-byte model does not count; an in-place optimizer step pays no such cost, so a row can
    exceed 100% of this figure there.
    """
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    copy = synchronized(lambda: dst.copy_(src), device)
    for _ in range(warmup):
        copy()
    return 8 * numel / statistics.median(time_calls(copy, steps)) / 1e9


def compare(rows: list[Row], copy_gbps: float) -> tuple[list[Row], str]:
    """Rows with % of copy bandwidth and speed relative to torch fused AdamW (foreach when fused is missing)."""
    baselines = {(r.optimizer, r.mode): r for r in rows}
    baseline = baselines.get(("torch AdamW", "fused")) or baselines[("torch AdamW", "foreach")]
    compared = [dataclasses.replace(r, pct_copy_bw=100.0 * r.gbps / copy_gbps, x_fused=r.it_s / baseline.it_s)
                for r in rows]
    return compared, f"torch-{baseline.mode}"


def aligned_table(columns, rows, numeric: Collection[int]) -> str:
    """``rows`` as a text table of ``columns`` (header, cell function) pairs; the columns whose
    index is in ``numeric`` are right-aligned, the others left-aligned."""
    cells = [[header for header, _ in columns]] + [[cell(r) for _, cell in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = []
    for line in cells:
        padded = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))]
        lines.append("  ".join(padded).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths).rstrip())
    return "\n".join(lines)


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


def triton_version() -> Optional[str]:
    """Triton's version, or None when it is not installed."""
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _command_output(argv: list[str], cwd: Optional[Path] = None) -> Optional[str]:
    """First line of a command's output, or None when it is missing or fails."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = result.stdout.strip().splitlines()
    return lines[0] if lines else None


def environment(device: torch.device, args: dict) -> dict:
    """What the numbers depend on: hardware, driver, versions, commit, time and arguments."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "device": str(device),
        "device_name": gpu or cpu_name(),
        "gpu_name": gpu,
        "driver": _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _command_output(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "args": args,
    }


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
