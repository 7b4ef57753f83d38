"""Seconds per DCM epoch on the demo model, against a plain bridge-hook training loop, in one process.

One epoch = every training step (forward and backward with the mask) plus the validation
check at its end. The baseline is the obvious implementation: ``run_with_hooks`` with a
hook_z mix on every masked layer, backward, Adam, clamp; a few of its steps are timed and
scaled to the epoch (its validation pass is timed in full). F is one plain no-grad forward
of a training batch, for scale. Usage:

    python benchmarks/dcm.py [--n 1000] [--desideratum object_value] [--position END]
                             [--layers 0-29] [--batch-size 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from tqdm.auto import tqdm


def hook_source_z(model, sub, layers, position):
    """Source z at ``position`` per layer, [b, H, dh], from a bridge run_with_cache."""
    names = {f"blocks.{layer}.attn.hook_z": layer for layer in layers}
    with torch.no_grad():
        _, cache = model.run_with_cache(sub.source_tokens, names_filter=lambda n: n in names)
    ar = torch.arange(len(sub))
    return {layer: cache[name][ar, sub.source_positions[position]] for name, layer in names.items()}


def hook_step(model, sub, heads, position, mask, opt, lam, src):
    """One training step the plain way: bridge hooks on hook_z, full logits, autograd."""
    pb = sub.base_positions[position]
    ar = torch.arange(len(sub))
    hooks = []
    for layer in sorted({h.layer for h in heads}):
        idx = [i for i, h in enumerate(heads) if h.layer == layer]
        cols = torch.tensor([heads[i].head for i in idx])

        def fn(z, hook, idx=idx, cols=cols, s=src[layer][:, cols]):
            m = mask[idx][None, :, None]
            where = (ar[:, None], pb[:, None], cols[None])
            return z.index_put(where, m * z[where] + (1 - m) * s)

        hooks.append((f"blocks.{layer}.attn.hook_z", fn))
    logits = model.run_with_hooks(sub.base_tokens, fwd_hooks=hooks)
    loss = -logits[ar, sub.base_positions["END"], sub.targets].mean() + lam * (1 - mask).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        mask.clamp_(0, 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="examples (split 60/20/20)")
    ap.add_argument(
        "--desideratum",
        default="object_value",
        choices=["positional", "object_value", "label_value"],
    )
    ap.add_argument("--position", default="END")
    ap.add_argument("--layers", default="0-29", help="masked layers, e.g. 0-29 or 15-29")
    ap.add_argument("--n-boxes", type=int, default=7)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--baseline-steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--model", default="demo")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from circuit_widgets import load_model, model_shape
    from circuit_widgets.core.masking import dcm
    from circuit_widgets.tasks import desiderata
    from circuit_widgets.types import Head

    model = load_model(args.model)
    for p in model.parameters():
        p.requires_grad_(False)
    shape = model_shape(model)
    lo, _, hi = args.layers.partition("-")
    layers = range(int(lo), int(hi or lo) + 1)
    heads = [Head(layer, h) for layer in layers for h in range(shape.n_heads)]
    d = desiderata(model, args.n, seed=0, n_boxes=args.n_boxes)[args.desideratum]
    train, val, test = d.split((0.6, 0.2, 0.2), seed=0)
    bs = args.batch_size
    print(
        f"model {args.model}: {shape.n_layers} layers x {shape.n_heads} heads "
        f"({shape.n_kv_heads} kv); desideratum {args.desideratum}, {args.n} examples "
        f"({len(train)}/{len(val)}/{len(test)}), {d.base_tokens.shape[1]} tokens, "
        f"{args.n_boxes} boxes; {len(heads)} heads (layers {args.layers}) at "
        f"{args.position}; batch {bs}; {torch.get_num_threads()} threads"
    )

    # ---- ours: one epoch, timed from the progress ticks
    steps = math.ceil(len(train) / bs)
    from circuit_widgets.core import cache

    # source z, then (when the fast engine runs the model) the base keys/values for windowed steps
    prep = sum(math.ceil(len(p) / bs) for p in (train, val, test))
    prep *= 2 if cache.engine_for(model) is not None else 1
    epoch_units = steps + math.ceil(len(val) / bs)
    stamps: list[float] = []
    bar = tqdm(desc="dcm (ours)", unit="batch")

    def progress(done: int, total: int) -> None:
        stamps.append(time.perf_counter())
        bar.total = total
        bar.update(done - bar.n)

    t0 = time.perf_counter()
    r = dcm(
        model, d, heads=heads, position=args.position, epochs=1, batch_size=bs, on_progress=progress
    )
    total = time.perf_counter() - t0
    bar.close()
    t_prep = stamps[prep - 1] - t0
    t_epoch = stamps[prep + epoch_units - 1] - stamps[prep - 1]
    t_step = (stamps[prep + steps - 1] - stamps[prep - 1]) / steps
    print(
        f"ours: {t_epoch:.1f} s per epoch ({steps} steps, {t_step:.2f} s/step, validation "
        f"included); source activations and base keys/values {t_prep:.1f} s; whole call {total:.1f} s"
    )
    print(f"  result: {r}")

    # ---- F: a plain forward of one training batch
    rows = torch.arange(min(bs, len(train)))
    sub = train.subset(rows)
    with torch.no_grad():
        model(sub.base_tokens)  # warm
        t = time.perf_counter()
        model(sub.base_tokens)
        f = time.perf_counter() - t

    # ---- baseline: plain bridge hooks
    mask = torch.ones(len(heads), requires_grad=True)
    opt = torch.optim.Adam([mask], lr=0.1)
    n_base = min(args.baseline_steps, steps)
    times = []
    for i in tqdm(range(n_base), desc="bridge-hook steps"):
        batch = train.subset(torch.arange(i * bs, min((i + 1) * bs, len(train))))
        src = hook_source_z(model, batch, sorted({h.layer for h in heads}), args.position)
        t = time.perf_counter()  # the source run is not timed: ours does it once, up front
        hook_step(model, batch, heads, args.position, mask, opt, 0.01, src)
        times.append(time.perf_counter() - t)
    base_step = sum(times) / len(times)
    t = time.perf_counter()
    for a in tqdm(range(0, len(val), bs), desc="bridge-hook validation"):
        with torch.no_grad():
            model(val.subset(torch.arange(a, min(a + bs, len(val)))).base_tokens)
    base_val = time.perf_counter() - t
    base_epoch = base_step * steps + base_val
    print(
        f"bridge hooks: {base_step:.2f} s/step ({n_base} steps timed), "
        f"{base_epoch:.1f} s per epoch (extrapolated to {steps} steps)"
    )
    print(f"F (plain forward, {len(sub)} prompts): {f:.2f} s")
    print(
        f"ratios: bridge-hook epoch / ours = {base_epoch / t_epoch:.2f}x; "
        f"our step = {t_step / f:.2f} F; bridge-hook step = {base_step / f:.2f} F"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
