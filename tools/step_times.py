"""Median milliseconds of one ``opt.step()`` on roberta-base's parameter list (125M fp32 elements),
torch fused AdamW against MaskedAdamW on one backend, eager or under ``torch.compile``.

    python tools/step_times.py --threads 2 [--compiled] [--backend native] [--steps 15]

Prints one JSON line.  It imports whichever childopt is first on ``sys.path``, so the same
script times two versions of the code on one machine (``PYTHONPATH=<other checkout>``).  Fixed random
gradients, 3 untimed warm-up steps (the compiles, under --compiled), then ``--steps`` timed ones.
Parameters, gradients and moments hold 2 GB, far above any last-level cache.
"""
import argparse
import json
import statistics
import time

import torch


def roberta_base_shapes() -> list:
    """roberta-base's parameter shapes, from childopt.bench (a module before 0.1.0's split, a package after)."""
    try:
        from childopt.bench.shapes import roberta_base_shapes as shapes
    except ImportError:
        from childopt.bench import roberta_base_shapes as shapes
    return shapes()


def make_params(shapes) -> list:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return params


def rows(backend: str) -> dict:
    from childopt import MaskedAdamW

    def dense_mask(params, density):
        gen = torch.Generator().manual_seed(1)
        return {p: torch.rand(p.shape, generator=gen) < density for p in params}

    return {
        "torch fused AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "mask=None": lambda ps: MaskedAdamW(ps, lr=1e-3, backend=backend),
        "dense 0.3 freeze": lambda ps: MaskedAdamW(ps, lr=1e-3, mask=dense_mask(ps, 0.3), backend=backend),
        "bernoulli 0.3": lambda ps: MaskedAdamW(ps, lr=1e-3, mask="bernoulli", reserve_p=0.3, seed=0,
                                                backend=backend),
        "sparse 0.05": lambda ps: MaskedAdamW(ps, lr=1e-3, mask=dense_mask(ps, 0.05), storage="sparse",
                                              backend=backend),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--compiled", action="store_true", help="time torch.compile(opt.step)")
    parser.add_argument("--backend", default="native")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--only", nargs="*", help="row names to time (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import childopt

    shapes = roberta_base_shapes()
    result = {}
    for name, make in rows(args.backend).items():
        if args.only and name not in args.only:
            continue
        params = make_params(shapes)
        opt = make(params)
        step = torch.compile(opt.step) if args.compiled else opt.step
        for _ in range(3):
            step()
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        result[name] = round(statistics.median(times) * 1e3, 2)
        del opt, params
    print(json.dumps({"childopt": childopt.__file__, "threads": args.threads, "compiled": args.compiled,
                      "elements": sum(torch.Size(s).numel() for s in shapes), "ms": result}))


if __name__ == "__main__":
    main()
