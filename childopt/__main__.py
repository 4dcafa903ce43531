"""Command line of childopt: ``python -m childopt {bench,info,doctor,build,clean,finetune,memory,selftest} ...``."""
from __future__ import annotations

import argparse
import os

COMMANDS = {
    "bench": "time optimizer and training steps of torch AdamW, childopt, the ChildTuning loop and LoRA, "
             "with the goals as ratios (python -m childopt bench --help)",
    "info": "versions, the GPU, and the backend auto picks per device, with the reason",
    "doctor": "what building and loading the native extension needs, its cache, builds and locks "
              "(python -m childopt doctor --help)",
    "build": "build the native extension childopt._C into the cache ahead of time (python -m childopt build --help)",
    "clean": "remove stale and unused native-extension builds from the cache (python -m childopt clean --help)",
    "finetune": "fine-tune on GLUE with AdamW and Child-Tuning, then a table and learning curves "
                "(python -m childopt finetune --help)",
    "memory": "peak memory per device of each fine-tuning method before training, by term "
              "(python -m childopt memory --help)",
    "selftest": "build, test, sanitize and benchmark every kernel on this machine, then a verdict per kernel "
                "(python -m childopt selftest --help)",
}


def _backend_lines(device) -> list[str]:
    """Which backend ``auto`` (or CHILDOPT_BACKEND, checked valid by the caller) picks for ``device``
    and why, and why each other one is not used; nothing here compiles."""
    from childopt import backends

    modules = backends.MODULES
    named = backends.requested("auto")
    if named == "auto":
        try:
            picked = backends.create("auto", device).name  # auto takes native only when ready: no build
        except RuntimeError as exc:
            return [f"  {device.type}: no backend ({exc})"]
    else:
        ok, why = backends.check_ready(modules[named], device)  # create() would build native
        if not ok and hasattr(modules[named], "ready"):
            return [f"  {device.type}: {named} (CHILDOPT_BACKEND={named}), not ready without a build: {why}"]
        if not ok:
            return [f"  {device.type}: no backend (backend {named!r} cannot run on {device}: {why})"]
        picked = named
    lines = [f"  {device.type}: {picked} ({backends.check_ready(modules[picked], device)[1]})"]
    for name, module in modules.items():
        if name == picked:
            continue
        ok, why = backends.check_ready(module, device)  # never compiles
        if ok and named != "auto":
            why = f"runs here, but CHILDOPT_BACKEND={named} overrides auto's pick"
        elif ok and device.type not in module.AUTO_DEVICES:
            why = f"runs here, but auto does not pick it for {device.type} tensors"
        lines.append(f"      not {name}: {why}")
    return lines


def info() -> int:
    """Print versions, CUDA availability and the backend choice per device; problems are lines of it (exit 0)."""
    import torch

    import childopt
    from childopt.bench.environment import triton_version

    from childopt import _native, backends

    cuda = torch.cuda.is_available()
    record = _native.prebuilt_record() or {}
    # A wheel's build record names it with its label (0.1.0+cu130torch2.11).
    print(f"childopt {record.get('version') or childopt.__version__}")
    print(f"torch    {torch.__version__} (built for CUDA {torch.version.cuda})")
    print(f"triton   {triton_version() or 'not installed'}")
    print(f"CUDA     {'available: ' + torch.cuda.get_device_name() if cuda else 'not available'}")

    print("native   childopt._C %s: %s" % _native.status())
    override = os.environ.get("CHILDOPT_BACKEND", "").strip()
    try:
        backends.requested("auto")
    except ValueError as exc:  # reported like a device no backend runs on: a line of the report, exit 0
        print(f"backend=auto picks nothing: {exc}; every optimizer left at backend='auto' raises this when built "
              "(unset it or set one of those; a backend passed by name, e.g. backend='reference', is unaffected)")
        return 0
    print("backend=auto picks" + (f" (CHILDOPT_BACKEND={override} overrides it)" if override else ""))
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if cuda else [])
    for device in devices:
        print("\n".join(_backend_lines(device)))
    return 0


def main(argv=None) -> int:
    """Dispatch to a subcommand; everything after its name is passed on to it."""
    parser = argparse.ArgumentParser(
        prog="python -m childopt", description="childopt: fused masked AdamW optimizers",
        epilog="commands:\n" + "\n".join(f"  {name:6} {text}" for name, text in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=COMMANDS, help="what to do")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the command")
    ns = parser.parse_args(argv)
    if ns.command == "bench":
        from childopt.bench import report

        return report.main(ns.args)
    if ns.command == "selftest":
        from childopt import selftest

        return selftest.main(ns.args)
    if ns.command == "memory":
        from childopt.memory import cli as memory_cli

        return memory_cli.main(ns.args)
    if ns.command == "finetune":
        from childopt.finetune import cli

        return cli.main(ns.args)
    if ns.command in ("doctor", "build", "clean"):
        from childopt import _native

        return getattr(_native, f"{ns.command}_main")(ns.args)
    info_parser = argparse.ArgumentParser(prog="python -m childopt info", description=COMMANDS["info"] + ".")
    _, extra = info_parser.parse_known_args(ns.args)  # --help answers; anything else is refused
    if extra:
        info_parser.error(f"info takes no arguments, got {' '.join(extra)}")
    return info()


if __name__ == "__main__":
    raise SystemExit(main())
