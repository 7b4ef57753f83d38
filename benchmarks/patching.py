"""Speed of the patching engine against TransformerLens' own patching, in one process.

Every time is printed as a multiple of F, one plain forward of the task's clean batch, and
each target is checked. Usage:

    python benchmarks/patching.py [--n-prompts 12] [--quick] [--model demo]

--quick times the slow baselines on a few heads only and extrapolates them to every head
(labelled "extrapolated"); our own sweeps always run in full.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from tqdm.auto import tqdm

TARGETS = {
    "all_pos": ("all-head all-position z patching", "TL all_pos / ours", 2.0, ">="),
    "end": ("all-head patching at END", "TL by_pos@END / ours", 10.0, ">="),
    "path": ("path patching to logits", "ours / suffix bound", 1.3, "<="),
    "path_frozen": ("path patching, freeze_mlps", "ours in F", 3.0, "<="),
    "attribution": ("attribution preview", "ours in F", 5.0, "<="),
}


def make_task(model, n: int, seed: int):
    """tasks.ioi when it exists, else a hand-built IOI-like task (right-padded)."""
    try:
        from circuit_widgets.tasks import ioi

        return ioi(model, n, seed=seed)
    except ImportError:
        pass
    from circuit_widgets.tasks.base import Task

    names = [" Mary", " John", " Alice", " Bob", " Kate", " Tom"]
    tok = model.tokenizer
    clean, corrupt, ans, wrong = [], [], [], []
    for i in range(n):
        a, b, c = names[i % 6], names[(i + 1) % 6], names[(i + 2) % 6]
        clean.append(f"When{a} and{b} went to the store,{b} gave a drink to")
        corrupt.append(f"When{a} and{b} went to the store,{c} gave a drink to")
        ans.append(tok.encode(a, add_special_tokens=False)[0])
        wrong.append(tok.encode(b, add_special_tokens=False)[0])
    enc = lambda ps: [tok.encode(p) for p in ps]
    ce, xe = enc(clean), enc(corrupt)
    s = max(len(t) for t in ce)
    pad = tok.pad_token_id or 0
    to_t = lambda rows: torch.tensor([r + [pad] * (s - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (s - len(r)) for r in ce])
    return Task(
        "ioi-like",
        to_t(ce),
        to_t(xe),
        mask,
        torch.tensor(ans),
        torch.tensor(wrong),
        {"END": mask.sum(1) - 1},
    )


class Clock:
    """Times work in units of F, one plain forward of the clean batch, measured locally.

    The machine is shared and its speed drifts by tens of percent within minutes, so long work
    is split into chunks (one layer's heads each) and every chunk is divided by the F measured
    right before and after it. Reported in wall-clock time and in this process's CPU time.
    """

    def __init__(self, forward) -> None:
        self.forward = forward

    def f(self) -> tuple[float, float]:
        w, c = time.perf_counter(), time.process_time()
        self.forward()
        return time.perf_counter() - w, time.process_time() - c

    def __call__(self, chunks, scale: float = 1.0, desc: str = "") -> tuple[float, float]:
        """(wall, CPU) multiples of F of running every chunk, times ``scale``."""
        wall = cpu = 0.0
        before = self.f()
        for chunk in tqdm(chunks, desc=desc[:40], leave=False, disable=len(chunks) < 2):
            w, c = time.perf_counter(), time.process_time()
            chunk()
            w, c = time.perf_counter() - w, time.process_time() - c
            after = self.f()
            wall += w / ((before[0] + after[0]) / 2)
            cpu += c / ((before[1] + after[1]) / 2)
            before = after
        return wall * scale, cpu * scale


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-prompts", type=int, default=12)
    ap.add_argument("--quick", action="store_true", help="baselines on a few heads, extrapolated")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import pandas as pd
    from transformer_lens import patching as tl_patching

    from circuit_widgets import core, load_model, model_shape

    model = load_model(args.model)
    for p in model.parameters():
        p.requires_grad_(False)
    task = make_task(model, args.n_prompts, seed=0)
    shape = model_shape(model)
    L, H = shape.n_layers, shape.n_heads
    dev = model.cfg.device
    clean = task.clean_tokens.to(dev)
    corrupt = task.corrupt_tokens.to(dev)
    print(
        f"model {args.model}: {L} layers x {H} heads ({shape.n_kv_heads} kv), task "
        f"{task.name}: {len(task)} prompts x {task.seq_len} tokens (lengths "
        f"{int(task.lengths.min())}-{int(task.lengths.max())}), torch threads "
        f"{torch.get_num_threads()}"
    )

    def forward():
        with torch.no_grad():
            model(clean)

    forward()
    clock = Clock(forward)
    fs = [clock.f() for _ in range(5)]
    print(
        f"F = {statistics.median(f[0] for f in fs):.3f} s wall, "
        f"{statistics.median(f[1] for f in fs):.3f} s CPU now (re-measured around every chunk)"
    )
    print(f"  {'item':<52} {'wall':>7} {'CPU':>7}")

    def report(label: str, chunks, scale: float = 1.0, note: str = "") -> tuple[float, float]:
        wall, cpu = clock(chunks, scale, desc=label)
        tqdm.write(f"  {label:<52} {wall:6.1f}F {cpu:6.1f}F  {note}")
        return wall, cpu

    # --- baselines: TransformerLens' own functions and a plain per-head loop, one layer a chunk
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
    metric = lambda logits: task.metric(logits).mean()
    layers = list(range(0, L, 3)) if args.quick else list(range(L))
    scale = L / len(layers)
    tag = f"(extrapolated from {len(layers)} of {L} layers)" if args.quick else ""
    end_mode = int(task.positions["END"].mode().values)

    def tl_cells(layer: int, by_pos: bool):
        rows = [(layer, end_mode, h) if by_pos else (layer, h) for h in range(H)]
        cols = ["layer", "pos", "head"] if by_pos else ["layer", "head"]
        setter = (
            tl_patching.layer_pos_head_vector_patch_setter
            if by_pos
            else tl_patching.layer_head_vector_patch_setter
        )
        with torch.no_grad():  # get_act_patch_attn_head_out_{all,by}_pos on these cells
            tl_patching.generic_activation_patch(
                model,
                corrupt,
                clean_cache,
                metric,
                patch_setter=setter,
                activation_name="z",
                index_df=pd.DataFrame(rows, columns=cols),
            )

    def loop_layer(layer: int):
        name = f"blocks.{layer}.attn.hook_z"
        with torch.no_grad():
            for h in range(H):

                def hook(z, hook=None, h=h):
                    z = z.clone()
                    z[:, :, h] = clean_cache[name][:, :, h]
                    return z

                metric(model.run_with_hooks(corrupt, fwd_hooks=[(name, hook)]))

    tl_all = report(
        "TL get_act_patch_attn_head_out_all_pos",
        [lambda l=l: tl_cells(l, False) for l in layers],
        scale,
        tag,
    )
    tl_end = report(
        "TL get_act_patch_attn_head_out_by_pos, END only",
        [lambda l=l: tl_cells(l, True) for l in layers],
        scale,
        tag + " (one END index for all prompts, as TL can)",
    )
    report(
        "plain per-head loop (run_with_hooks on hook_z)",
        [lambda l=l: loop_layer(l) for l in layers],
        scale,
        tag,
    )

    # a head patched at layer l needs layers l.. only: the bound for whole-suffix reruns
    suffix = sum((L - l) / L for l in range(L) for _ in range(H))
    print(f"  {'suffix bound: sum over heads of (n_layers - l) / n_layers':<52} {suffix:6.1f}F")

    # --- ours: every head, exact (attribution excepted), one layer's heads a chunk where the
    # sweep is long. Attribution runs first on a cold cache: its time includes the corrupt run.
    core.clear_cache()
    per_layer = lambda fn: [lambda l=l: fn([(l, h) for h in range(H)]) for l in range(L)]
    attribution = report(
        "ours: attribution_patch z (cold cache, incl. corrupt run)",
        [lambda: core.attribution_patch(model, task, "z")],
    )
    report(
        "ours: path_attribution -> logits (the widget's preview)",
        [lambda: core.path_attribution(model, task)],
    )
    report(
        "ours: clean + corrupt runs (the cache, built once)",
        [lambda: core.activation_patch(model, task, heads=[(0, 0)])],
    )
    ours_all = report(
        "ours: activation_patch z, all positions",
        per_layer(lambda hs: core.activation_patch(model, task, heads=hs)),
    )
    ours_end = report(
        "ours: activation_patch z, END",
        per_layer(lambda hs: core.activation_patch(model, task, positions="END", heads=hs)),
    )
    path = report("ours: path_patch -> logits", [lambda: core.path_patch(model, task)])
    path_frozen = report(
        "ours: path_patch -> logits, freeze_mlps",
        [lambda: core.path_patch(model, task, freeze_mlps=True)],
    )

    results = {
        "all_pos": tuple(t / o for t, o in zip(tl_all, ours_all)),
        "end": tuple(t / o for t, o in zip(tl_end, ours_end)),
        "path": tuple(p / suffix for p in path),
        "path_frozen": path_frozen,
        "attribution": attribution,
    }
    print("\nTargets (ours exact except attribution), wall clock / CPU time:")
    for key, (what, ratio, target, op) in TARGETS.items():
        ok = [(v >= target) if op == ">=" else (v <= target) for v in results[key]]
        wall, cpu = results[key]
        print(
            f"  {what:<36} {ratio:<22} = {wall:7.2f} / {cpu:7.2f}  target {op} {target:<5} "
            f"{'MET' if all(ok) else ('MET on one clock' if any(ok) else 'MISSED')}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
