"""``python -m childopt bench``: how fast one optimizer step is, and how close to memory bandwidth.

Every row steps a fresh copy of the same parameter list (roberta-base shapes, shrunk on CPU and
for ``--quick``) whose gradients are fixed random tensors set once, so only ``opt.step()`` is
timed: a few untimed warm-up steps (the first Triton step compiles), then the median wall time
of the timed steps, with a device synchronize after each step on CUDA.

An optimizer step is memory-bound, so each row also carries a byte model (the bytes the step
has to move per element) and turns it into achieved GB/s, compared with the bandwidth of a plain
``dst.copy_(src)`` of the same size measured in the same run.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from childopt import ChildTuningAdamW, MaskedAdamW, backends
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


def _sparse_row(density: float) -> "RowSpec":
    """MaskedAdamW with sparse-index storage of a random child network of ``density``."""
    return RowSpec(f"masked-sparse-{density}", "MaskedAdamW", f"sparse {density}", SPARSE_ENTRY_BYTES * density,
                   lambda ps, backend: MaskedAdamW(ps, mask=_dense_mask(ps, density), storage="sparse",
                                                   backend=backend, **HYPER))


@dataclass(frozen=True)
class RowSpec:
    """One benchmark row: how to build its optimizer over a parameter list, and its byte model.

    ``make(params, backend)`` builds the optimizer; ``backend`` is the label of rows that do not
    run on a childopt backend (childopt optimizers report theirs); an ``optional`` row is skipped,
    with the reason, when it cannot run on the device.  ``scales_grads`` marks optimizers that
    multiply the gradient in place (the published ChildTuning loop): their gradients are restored
    between timed steps, outside the timer, so repeated steps never reach inf.
    """

    key: str
    optimizer: str
    mode: str
    bytes_per_element: float
    make: Callable[[list, str], torch.optim.Optimizer]
    backend: Optional[str] = None
    optional: bool = False
    scales_grads: bool = False


ROWS = (
    RowSpec("adamw-foreach", "torch AdamW", "foreach", ADAMW_BYTES,
            lambda ps, backend: torch.optim.AdamW(ps, foreach=True, **HYPER), backend="torch"),
    RowSpec("adamw-fused", "torch AdamW", "fused", ADAMW_BYTES,
            lambda ps, backend: torch.optim.AdamW(ps, fused=True, **HYPER), backend="torch", optional=True),
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

    On Linux writing 5 to /proc/self/clear_refs resets the RSS high-water mark that
    ``ru_maxrss`` reports; elsewhere the CPU peak counts from process start.
    """
    if device.type == "cuda":
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
    return Row(optimizer=spec.optimizer, mode=spec.mode, backend=backend, it_s=1.0 / seconds,
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


def format_table(rows: list[Row], baseline: str) -> str:
    """The results as an aligned text table (text columns left-aligned, numbers right-aligned)."""
    columns = (
        ("optimizer", lambda r: r.optimizer), ("mode", lambda r: r.mode), ("backend", lambda r: r.backend),
        ("it/s", lambda r: f"{r.it_s:.2f}"), ("ms/step", lambda r: f"{r.ms_per_step:.2f}"),
        ("peak GB", lambda r: f"{r.peak_gb:.3f}"), ("state GB", lambda r: f"{r.state_gb:.3f}"),
        ("GB/s", lambda r: f"{r.gbps:.1f}"), ("% copy BW", lambda r: f"{r.pct_copy_bw:.0f}%"),
        (f"x {baseline}", lambda r: f"{r.x_fused:.2f}x"),
    )
    cells = [[header for header, _ in columns]] + [[cell(r) for _, cell in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = []
    for line in cells:
        padded = [c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))]
        lines.append("  ".join(padded))
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


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


def plot(rows: list[Row], path: str, title: str) -> None:
    """Save a two-panel horizontal bar chart: it/s, and peak and state GB, per optimizer and mode."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from exc
    labels = [f"{r.optimizer}\n{r.mode} [{r.backend}]" for r in rows]
    ticks = list(range(len(rows)))
    fig = Figure(figsize=(13, 1.0 + 0.6 * len(rows)), layout="constrained")
    speed, memory = fig.subplots(1, 2, sharey=True)
    bars = speed.barh(ticks, [r.it_s for r in rows], color="tab:blue")
    speed.bar_label(bars, fmt="%.2f", padding=3)
    speed.set_yticks(ticks, labels)
    speed.invert_yaxis()
    speed.set_xlabel("optimizer steps per second (higher is better)")
    speed.margins(x=0.15)
    for offset, attr, label, color in ((-0.2, "peak_gb", "peak GB", "tab:orange"),
                                       (0.2, "state_gb", "state GB", "tab:green")):
        values = [getattr(r, attr) for r in rows]
        bars = memory.barh([t + offset for t in ticks], values, height=0.4, label=label, color=color)
        memory.bar_label(bars, fmt="%.2f", padding=3, fontsize=8)
    memory.set_xlabel("GB (lower is better)")
    memory.legend(loc="lower right")
    memory.margins(x=0.15)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line of ``python -m childopt bench``."""
    parser = argparse.ArgumentParser(
        prog="python -m childopt bench",
        description="Time one optimizer step of torch AdamW, the childopt optimizers and the ChildTuning loop, "
                    "with memory and achieved bandwidth.")
    parser.add_argument("--quick", action="store_true", help="a smaller parameter list and fewer steps")
    parser.add_argument("--json", metavar="PATH", help="write the environment and every row as JSON")
    parser.add_argument("--plot", metavar="PATH", help="save a PNG bar chart (needs matplotlib)")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="where the tensors live (default: cuda when available, else cpu)")
    parser.add_argument("--steps", type=int, metavar="N", help="timed steps per row (default: by device and size)")
    parser.add_argument("--backend", choices=backends.CHOICES, default="auto",
                        help="the childopt backend of the childopt rows (default: auto's pick per device)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available to this torch")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    return args


def run_rows(shapes, device: torch.device, *, warmup: int, steps: int,
             backend: str = "auto") -> tuple[list[Row], list[dict]]:
    """Measure every row of ``ROWS`` under a progress bar; optional rows that cannot run are skipped with the reason."""
    rows, skipped = [], []
    for spec in tqdm(ROWS, desc="bench", unit="row"):
        try:
            rows.append(run_row(spec, shapes, device, warmup=warmup, steps=steps, backend=backend))
        except (RuntimeError, ValueError) as exc:
            if not spec.optional:
                raise
            skipped.append({"optimizer": spec.optimizer, "mode": spec.mode, "reason": str(exc)})
    return rows, skipped


def describe_run(device: torch.device, shapes, scale: float, layers: Optional[int], steps: int) -> dict:
    """What was stepped and how it was measured, for the header and the JSON meta."""
    rss_window = "each row's timed steps" if reset_peak_memory(device) else "process start"
    return {
        "peak_gb": ("torch.cuda.max_memory_allocated over the timed steps" if device.type == "cuda"
                    else f"process peak RSS since {rss_window}"),
        "state_gb": "bytes of the tensors in optimizer.state",
        "params": {"numel": sum(torch.Size(s).numel() for s in shapes), "tensors": len(shapes),
                   "scale": scale, "layers": layers},
        "warmup": WARMUP,
        "steps": steps,
    }


def main(argv=None) -> int:
    """Run every row, print the table, and write the JSON and the plot when asked."""
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    scale, layers, default_steps = SIZES[(device.type, args.quick)]
    steps = args.steps or default_steps
    shapes = roberta_base_shapes(scale, layers)
    meta = {**environment(device, vars(args)), **describe_run(device, shapes, scale, layers, steps)}
    numel = meta["params"]["numel"]
    print(f"childopt bench on {meta['device_name']} ({device}); torch {meta['torch']}, "
          f"triton {meta['triton'] or 'not installed'}, CUDA {meta['cuda']}, python {meta['python']}")
    print(f"{numel / 1e6:.1f}M fp32 parameters in {len(shapes)} tensors; "
          f"{WARMUP} warm-up + {steps} timed steps per row")
    print(f"peak GB: {meta['peak_gb']}; state GB: {meta['state_gb']}")

    copy_gbps = measure_copy_gbps(numel, device, warmup=WARMUP, steps=steps)
    rows, skipped = run_rows(shapes, device, warmup=WARMUP, steps=steps, backend=args.backend)
    rows, baseline = compare(rows, copy_gbps)
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s (dst.copy_(src), fp32, 8 B per element)")
    print(format_table(rows, baseline))
    for skip in skipped:
        print(f"skipped {skip['optimizer']} {skip['mode']}: {skip['reason']}")
    if args.json:
        report = {"meta": meta, "copy_gbps": copy_gbps, "rows": [dataclasses.asdict(r) for r in rows],
                  "skipped": skipped}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot(rows, args.plot, f"childopt bench: {meta['device_name']}, {numel / 1e6:.1f}M fp32 params")
        print(f"wrote {args.plot}")
    return 0
