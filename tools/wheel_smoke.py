"""Smoke test of an installed childopt wheel, run in a fresh environment holding torch and the wheel.

    python tools/wheel_smoke.py            # the prebuilt childopt._C must fit and load
    python tools/wheel_smoke.py --guard    # after its _build_info.json was altered: one warning, a fallback

Default: ``import childopt`` prints no guard warning, the prebuilt module loads (no JIT build),
and its CPU ops step MaskedAdamW (none / dense freeze / Bernoulli freeze) like the reference
backend: within 1e-6 relative (the two differ only in float32 rounding order), with the
entries the reference leaves frozen bit-identical; a step runs on both of 2 intra-op threads,
and the process holds one OpenMP runtime (torch's), not a grafted second one.
``--guard``: the import prints the guard's message once, the prebuilt module is not loaded, and
``backend='auto'`` (Triton where it runs, else the reference backend) steps as
torch.optim.AdamW does.
CUDA ops are not exercised: that needs a GPU (``pytest -m cuda`` there).
"""
import argparse
import importlib.metadata
import io
import logging
import sys


def capture_childopt_log() -> io.StringIO:
    """What the "childopt" logger says from here on (the guard's warning goes there)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("childopt")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return stream


def step_twice(make_optimizer, mask_kind: str = "none"):
    """Parameters after two steps of ``make_optimizer(params, **mask_kwargs)`` on fixed data, their start, and
    the optimizer."""
    import torch

    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(1000, generator=gen, requires_grad=True), torch.randn(33, 7, generator=gen, requires_grad=True)]
    start = [p.detach().clone() for p in params]
    mask_kwargs = {}
    if mask_kind == "dense":
        mask_kwargs = {"mask": {p: torch.rand(p.shape, generator=gen) < 0.3 for p in params}, "masked": "freeze"}
    elif mask_kind == "bernoulli":
        mask_kwargs = {"reserve_p": 0.3, "masked": "freeze"}
    opt = make_optimizer(params, **mask_kwargs)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return [p.detach() for p in params], start, opt


def masked_adamw(backend: str):
    from childopt import MaskedAdamW

    return lambda params, **kw: MaskedAdamW(params, lr=1e-2, weight_decay=0.01, seed=7, backend=backend, **kw)


def check_native_steps() -> None:
    """The prebuilt module's CPU steps against the reference backend, mask by mask."""
    import torch

    for mask_kind in ("none", "dense", "bernoulli"):
        got, start, opt = step_twice(masked_adamw("native"), mask_kind)
        want, _, _ = step_twice(masked_adamw("reference"), mask_kind)
        assert opt.backend_name() == "native", opt.backend_name()
        for g, w, s in zip(got, want, start):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7, msg=f"native vs reference, mask {mask_kind}")
            if mask_kind != "none":
                frozen = w == s
                assert torch.equal(g[frozen], s[frozen]), f"native: frozen entries moved (mask {mask_kind})"
        print(f"ok: native matches the reference backend, mask {mask_kind}")


def check_fallback_step() -> None:
    """backend='auto' once the guard refused the prebuilt module: it steps as torch.optim.AdamW does."""
    import torch

    got, _, opt = step_twice(masked_adamw("auto"))
    want, _, _ = step_twice(lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7, msg=f"auto ({opt.backend_name()}) vs torch AdamW")
    print(f"ok: auto took {opt.backend_name()} and matches torch.optim.AdamW")


def check_threads(module) -> None:
    """A native step runs chunks on 2 threads when torch has 2, through torch's own OpenMP runtime."""
    import torch

    from childopt import MaskedAdamW

    torch.set_num_threads(2)
    params = [torch.nn.Parameter(torch.ones(1 << 18)) for _ in range(4)]
    for p in params:
        p.grad = torch.ones_like(p)
    opt = MaskedAdamW(params, lr=1e-3, backend="native")
    module._record_chunk_threads(True)
    opt.step()
    used = module._chunk_thread_count()
    module._record_chunk_threads(False)
    assert used == 2, f"a step over 4 x 256K elements ran on {used} thread(s) with torch.get_num_threads() == 2"
    with open("/proc/self/maps") as maps:
        runtimes = {line.split()[-1] for line in maps if "libgomp" in line or "libiomp5" in line}
    assert len(runtimes) <= 1, f"more than one OpenMP runtime is loaded: {sorted(runtimes)}"
    print(f"threads: a step used {used} threads; OpenMP runtime: {sorted(runtimes)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--guard", action="store_true", help="expect the guard's warning and a fallback")
    args = parser.parse_args(argv)
    log = capture_childopt_log()
    import childopt
    from childopt import _native

    record = _native.prebuilt_record()
    assert record and "unreadable" not in record, f"no readable build record beside {childopt.__file__}: {record}"
    print(f"childopt {record.get('version')} from {childopt.__file__}")
    installed = importlib.metadata.version("childopt")
    assert installed == record.get("version"), f"pip installed {installed}, the build record says {record.get('version')}"
    warnings = [line for line in log.getvalue().splitlines() if "prebuilt" in line]
    if args.guard:
        assert len(warnings) == 1, f"expected one guard warning at import, got {warnings}"
        print(f"guard: {warnings[0]}")
        module, how = _native.try_load(build=False)
        assert module is None or not how.startswith("prebuilt"), f"the mismatched prebuilt module was loaded: {how}"
        check_fallback_step()
        again = [line for line in log.getvalue().splitlines() if "prebuilt" in line]
        assert again == warnings, f"the guard spoke more than once: {again}"
    else:
        assert not warnings, f"the installed build was refused: {warnings}"
        module, how = _native.try_load(build=False)
        assert module is not None and how.startswith("prebuilt"), f"the prebuilt childopt._C did not load: {how}"
        print(f"loaded: {how}")
        check_native_steps()
        check_threads(module)
    return 0


if __name__ == "__main__":
    sys.exit(main())
