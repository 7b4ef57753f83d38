"""The demo's IOI END grid through nnsight (in-process and NDIF's local simulation) against the
fast engine and TransformerLens hooks, in one process, as multiples of F (one plain forward of
the clean batch), with each run's request count and its largest difference from the fast engine.
Usage:

    python benchmarks/remote.py [--n-prompts 12] [--model demo] [--component z] [--quick]

--quick runs the TransformerLens-hooks baseline (one bridge forward per cell) on 3 layers only
and extrapolates it to the whole grid (labelled "extrapolated").
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-prompts", type=int, default=12)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--component", default="z")
    ap.add_argument("--quick", action="store_true", help="TL baseline on 3 layers, extrapolated")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import circuit_widgets as cw
    from circuit_widgets.core import cache

    model = cw.load_model(args.model)
    for p in model.parameters():
        p.requires_grad_(False)
    task = cw.tasks.ioi(model, args.n_prompts, seed=0)
    shape = cw.models.model_shape(model)
    L, H = shape.n_layers, shape.n_heads
    clean = task.clean_tokens.to(model.cfg.device)
    print(
        f"model {args.model}: {L} layers x {H} heads ({shape.n_kv_heads} kv); IOI END grid of "
        f"{args.component}, {len(task)} prompts x {task.seq_len} tokens; torch threads "
        f"{torch.get_num_threads()}"
    )

    def forward():
        with torch.no_grad():
            model(clean)

    forward()
    fs = []
    for _ in range(5):
        t = time.perf_counter()
        forward()
        fs.append(time.perf_counter() - t)
    F = statistics.median(fs)
    print(f"F = {F:.3f} s (median of 5 plain bridge forwards)")
    print(f"  {'engine':<40} {'time':>8} {'requests':>9} {'max |diff| vs fast':>19}")

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t

    def row(label, seconds, requests, diff):
        print(f"  {label:<40} {seconds / F:7.1f}F {requests:>9} {diff:>19}")

    run = lambda m, **kw: cw.activation_patch(
        m, task, component=args.component, positions="END", **kw
    )
    cache.clear_cache()
    fast, t_fast = timed(lambda: run(model))
    row("fast engine (clean/corrupt runs included)", t_fast, "-", "0")

    layers = list(range(3)) if args.quick else list(range(L))
    n_cols = fast.values.shape[-1]
    subset = [(layer, h) for layer in layers for h in range(n_cols)]
    with cache.force_hooked():
        cache.clear_cache()
        hooked, t_hooked = timed(lambda: run(model, heads=subset))
    scale = L / len(layers)
    d = float((hooked.values[layers] - fast.values[layers]).abs().nan_to_num(0).max())
    tag = f" (extrapolated from {len(layers)} layers)" if args.quick else ""
    row(
        f"TransformerLens hooks{tag}",
        t_hooked * scale,
        f"{int(len(subset) * scale)} fwd",
        f"{d:.1e}",
    )

    for remote in (False, "local"):
        nm = cw.load_model(model, backend="nnsight", remote=remote)
        grid, t_nn = timed(lambda nm=nm: run(nm))
        d = float((grid.values - fast.values).abs().max())
        row(f"nnsight remote={remote!r}", t_nn, nm.requests, f"{d:.1e}")
    print(f"  (nnsight request bound: {L} layers -> at most {L} requests; {grid.notes[0]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
