"""The demo's IOI END grid through nnsight (in-process and NDIF's local simulation) against the
fast engine and TransformerLens hooks, in one process, as multiples of F (one plain forward of
the clean batch), with each run's request count and its largest difference from the fast engine.
Usage:

    python benchmarks/remote.py [--n-prompts 12] [--model demo] [--component z] [--quick]

--quick runs the TransformerLens-hooks baseline (one bridge forward per cell) on 3 layers only
and extrapolates it to the whole grid (labelled "extrapolated"); --layers K does the same for
the nnsight runs too (on a busy machine), and prints the request count of the whole grid.
--more also times attribution_patch, faithfulness (5 random circuits), completeness,
intervene's edits, dcm (one lambda), cmap_grid (k) and cmap (z, two groups and the circuit;
both the model against demo-arith when --model is demo, else against itself) on the fast engine
and through NDIF's local simulation, with request counts and the largest difference.
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
    ap.add_argument("--layers", type=int, default=None, help="nnsight on K layers, extrapolated")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--more", action="store_true", help="attribution, ..., cmap_grid, cmap")
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

    nn_layers = list(range(args.layers)) if args.layers else list(range(L))
    nn_subset = [(layer, h) for layer in nn_layers for h in range(n_cols)]
    nn_scale = L / len(nn_layers)
    tag = f" (extrapolated from {len(nn_layers)} layers)" if args.layers else ""
    for remote in (False, "local"):
        nm = cw.load_model(model, backend="nnsight", remote=remote)
        grid, t_nn = timed(lambda nm=nm: run(nm, heads=nn_subset))
        d = float((grid.values - fast.values)[nn_layers].abs().max())
        row(f"nnsight remote={remote!r}{tag}", t_nn * nn_scale, nm.requests, f"{d:.1e}")
    per_request = max(n_cols, 512 // len(task))
    whole = -(-L * n_cols // per_request)
    print(f"  whole grid through nnsight: {whole} request(s) of up to {per_request} cells (<= {L})")
    if args.more:
        more(model, task, args, F, timed)
    return 0


def more(model, task, args, F, timed) -> None:
    """Other experiments, fast engine vs nnsight's local simulation (times as multiples of F)."""
    import circuit_widgets as cw
    from circuit_widgets.core import cache

    nm = cw.load_model(model, backend="nnsight", remote="local")
    print(f"  {'experiment':<40} {'fast':>8} {'nnsight':>8} {'requests':>9} {'max |diff|':>11}")

    def compare(label, fn, diff, model_b=None, nm_b=None):
        cache.clear_cache()
        ref, t_ref = timed(lambda: fn(model, model_b))
        nm.requests = 0
        if nm_b is not None:
            nm_b.requests = 0
        got, t_got = timed(lambda: fn(nm, nm_b))
        n = nm.requests + (nm_b.requests if nm_b is not None and nm_b is not nm else 0)
        print(f"  {label:<40} {t_ref / F:7.1f}F {t_got / F:7.1f}F {n:>9} {diff(got, ref):>11.1e}")

    grid_diff = lambda g, r: float((g.per_example - r.per_example).abs().nan_to_num(0).max())
    compare(
        f"attribution_patch ({args.component}, all positions)",
        lambda m, _: cw.attribution_patch(m, task, args.component),
        grid_diff,
    )
    circuit = [(9, 4), (9, 6), (10, 0), (14, 1), (22, 3)] if args.model == "demo" else [(0, 0)]
    compare(
        "faithfulness (n_random=5)",
        lambda m, _: cw.faithfulness(m, task, circuit, n_random=5),
        lambda g, r: max(
            abs(a - b) for a, b in zip([g.ratio, *g.random_metric], [r.ratio, *r.random_metric])
        ),
    )
    compare(
        "completeness (groups + 5 random subsets)",
        lambda m, _: cw.completeness(m, task, circuit, n_random=5),
        lambda g, r: max(abs(a - b) for a, b in zip(g.scores, r.scores)),
    )
    iv = {"heads": [circuit[0], circuit[-1]], "attend_to": "S1", "scale": {circuit[-1]: 0.0}}
    end = task.positions["END"]
    compare(
        "intervene(...).edits() via run_with_edits",
        lambda m, _: cw.run_with_edits(
            m, task.clean_tokens, cw.intervene(m, task, **iv).edits(), at=end
        ),
        lambda g, r: float((g.logits - r.logits).abs().max()),
    )
    from circuit_widgets.tasks import desiderata

    des = desiderata(model, 24, seed=0, n_boxes=3)["object_value"]
    heads = [
        f"{layer}.{h}"
        for layer in range(model.cfg.n_layers // 2, model.cfg.n_layers)
        for h in range(2)
    ]
    compare(
        f"dcm ({len(heads)} heads, 24 pairs, 2 epochs, batch 4)",
        lambda m, _: cw.dcm(m, des, heads=heads, epochs=2, batch_size=4, lam=0.01, lr=0.3),
        lambda g, r: float((g.final_mask - r.final_mask).abs().nan_to_num(0).max()),
    )
    twin = model
    if args.model == "demo":
        twin = cw.load_model("demo-arith")
        for p in twin.parameters():
            p.requires_grad_(False)
    twin_nn = cw.load_model(twin, backend="nnsight", remote="local")
    compare(
        "cmap_grid (k at END)" + (" vs demo-arith" if twin is not model else " vs itself"),
        lambda m, f: cw.cmap_grid(m, f, task, component="k"),
        grid_diff,
        twin,
        twin_nn,
    )
    groups = cw.Circuit.from_groups({"early": circuit[:2], "late": circuit[2:]})
    compare(
        "cmap (z, 2 groups + the circuit)" + (" vs demo-arith" if twin is not model else ""),
        lambda m, f: cw.cmap(m, f, task, circuit=groups, component="z"),
        lambda g, r: float((g.patched_metric - r.patched_metric).abs().nan_to_num(0).max()),
        twin,
        twin_nn,
    )


if __name__ == "__main__":
    raise SystemExit(main())
