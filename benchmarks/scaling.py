"""Sweeps whose time per prompt and memory stay flat as the task grows.

The END grid (activation_patch of every head's z at END) on the demo model's IOI task at
several sizes, each size in a fresh process so that its peak RSS is its own. Prints seconds
per prompt (target: flat within 20% from the smallest size to the largest) and peak RSS
(target: under 4 GB at 1,000 prompts). Usage:

    python benchmarks/scaling.py [--sizes 32 128 512 1000] [--layers 30] [--max-memory 1GB]

--layers N patches the heads of N evenly spaced layers only (same per-prompt behaviour,
less time on a busy machine); say so when quoting the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FLAT = 0.20
RSS_LIMIT_GB = 4.0


def one(n: int, n_layers: int | None, max_memory: str | None, threads: int = 1) -> dict:
    import torch

    torch.set_num_threads(threads)
    from circuit_widgets import core, load_model, model_shape
    from circuit_widgets.tasks import ioi

    model = load_model("demo")
    for p in model.parameters():
        p.requires_grad_(False)
    task = ioi(model, n, seed=0)
    shape = model_shape(model)
    L, H = shape.n_layers, shape.n_heads
    layers = (
        range(L)
        if not n_layers
        else sorted({round(i * (L - 1) / max(n_layers - 1, 1)) for i in range(n_layers)})
    )
    heads = [(l, h) for l in layers for h in range(H)]
    t = time.perf_counter()
    grid = core.activation_patch(model, task, positions="END", heads=heads, max_memory=max_memory)
    wall = time.perf_counter() - t
    assert grid.complete and bool(grid.done.sum() == len(heads))
    chunks = next((x for x in grid.notes if "chunks" in x), "1 chunk")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB
    return {
        "n": n,
        "tokens": task.seq_len,
        "heads": len(heads),
        "seconds": wall,
        "per_prompt": wall / n,
        "peak_rss_gb": rss / 1e9,
        "chunks": chunks,
        "threads": torch.get_num_threads(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 128, 512, 1000])
    ap.add_argument("--layers", type=int, default=None, help="heads of N evenly spaced layers")
    ap.add_argument("--max-memory", default=None, help="sweep budget (default: from free RAM)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: a shared machine)")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one(args.one, args.layers, args.max_memory, args.threads)))
        return 0
    rows = []
    print(
        f"{'prompts':>8} {'tokens':>7} {'heads':>6} {'seconds':>9} {'s/prompt':>9} {'peak RSS':>9}  chunks"
    )
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--one", str(n), "--threads", str(args.threads)]
        if args.layers:
            cmd += ["--layers", str(args.layers)]
        if args.max_memory:
            cmd += ["--max-memory", args.max_memory]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(
            f"{r['n']:>8} {r['tokens']:>7} {r['heads']:>6} {r['seconds']:>9.1f} "
            f"{r['per_prompt']:>9.3f} {r['peak_rss_gb']:>7.2f}GB  {r['chunks']}",
            flush=True,
        )
    per = [r["per_prompt"] for r in rows]
    spread = max(per) / min(per) - 1
    print(
        f"\nseconds/prompt: largest / smallest size = {per[-1] / per[0]:.2f}, max spread {spread:.0%}"
    )
    print(f"  target flat within {FLAT:.0%}: {'MET' if spread <= FLAT else 'MISSED'}")
    last = rows[-1]
    ok = last["peak_rss_gb"] < RSS_LIMIT_GB
    print(
        f"peak RSS at {last['n']} prompts: {last['peak_rss_gb']:.2f} GB; target < {RSS_LIMIT_GB} GB: "
        f"{'MET' if ok else 'MISSED'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
