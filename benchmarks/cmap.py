"""Cross-model patching (CMAP) at the speed of activation patching, in one process.

cmap_grid at END (demo vs demo-arith) against activation_patch at END on the same task (both
every head of z), and against a plain TransformerLens hook loop (the fine-tuned hook_z cached,
one base forward per head). Times are wall-clock seconds on this machine, each ours measured
twice: cold (cache cleared, so the runs it resumes from are included) and warm. Usage:

    python benchmarks/cmap.py [--n-prompts 32] [--loop-layers 3] [--model demo]

The plain loop runs on --loop-layers layers' heads and is extrapolated to every head.
Target: cmap_grid <= 1.5 x activation_patch at END.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

TARGET = 1.5


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-prompts", type=int, default=32)
    ap.add_argument("--loop-layers", type=int, default=3)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--finetuned", default="demo-arith")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: a shared machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from circuit_widgets import core, load_model, model_shape
    from circuit_widgets.core.cross_model import cmap_grid
    from circuit_widgets.tasks import ioi

    base, ft = load_model(args.model), load_model(args.finetuned)
    for m in (base, ft):
        for p in m.parameters():
            p.requires_grad_(False)
    task = ioi(base, args.n_prompts, seed=0)
    shape = model_shape(base)
    L, H = shape.n_layers, shape.n_heads
    engines = core.cache.engine_for(base) is not None and core.cache.engine_for(ft) is not None
    print(
        f"{args.model} vs {args.finetuned}: {L} layers x {H} heads; task {task.name}: "
        f"{len(task)} prompts x {task.seq_len} tokens; torch threads {torch.get_num_threads()}; "
        f"fast engine on both models: {engines}"
    )

    def act():
        return core.activation_patch(base, task, positions="END")

    def cm():
        return cmap_grid(base, ft, task, position="END")

    rows = []
    for label, fn in (("activation_patch z @END", act), ("cmap_grid z @END", cm)):
        core.clear_cache()
        cold, grid = timed(fn)
        warm, _ = timed(fn)
        assert grid.complete and not any("generic path" in n for n in grid.notes)
        rows.append((label, cold, warm))
        print(f"  {label:<34} cold {cold:7.1f} s   warm {warm:7.1f} s")

    # plain hooks: cache the fine-tuned hook_z once, one base forward per head at END
    layers = list(range(0, L, max(1, L // args.loop_layers)))[: args.loop_layers]
    clean = task.clean_tokens
    rows_i = torch.arange(len(task))
    end = task.positions["END"]

    def loop() -> None:
        names = [f"blocks.{l}.attn.hook_z" for l in layers]
        with torch.no_grad():
            _, ft_cache = ft.run_with_cache(clean, names_filter=names)
            for l, name in zip(layers, names):
                for h in range(H):

                    def hook(z, hook=None, h=h, name=name):
                        z = z.clone()
                        z[rows_i, end, h] = ft_cache[name][rows_i, end, h]
                        return z

                    task.metric(base.run_with_hooks(clean, fwd_hooks=[(name, hook)]))

    t_loop, _ = timed(loop)
    t_loop_all = t_loop * L / len(layers)
    print(
        f"  {'plain hook loop z @END':<34} {t_loop:7.1f} s on {len(layers)} layers -> "
        f"{t_loop_all:7.1f} s for all {L} (extrapolated)"
    )
    (_, a_cold, a_warm), (_, c_cold, c_warm) = rows
    print("\nRatios (same task, same process):")
    print(
        f"  cmap_grid / activation_patch, cold: {c_cold / a_cold:5.2f}   warm: {c_warm / a_warm:5.2f}"
    )
    print(f"  plain hook loop / cmap_grid (cold):  {t_loop_all / c_cold:5.1f}x")
    ok = c_cold / a_cold <= TARGET and c_warm / a_warm <= TARGET
    print(f"  target cmap_grid <= {TARGET} x activation_patch: {'MET' if ok else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
