"""``python -m circuit_widgets.finetune arithmetic|entity_tracking --out DIR [--steps N ...]``
and ``evaluate``."""

from __future__ import annotations

import argparse
import shlex
import sys


def main(argv: list[str] | None = None) -> int:
    from circuit_widgets.finetune import ArithmeticRecipe, EntityTrackingRecipe

    d = ArithmeticRecipe()
    b = EntityTrackingRecipe()
    p = argparse.ArgumentParser(prog="python -m circuit_widgets.finetune")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("arithmetic", help="LoRA-fine-tune the demo model on Goat-style arithmetic")
    t.add_argument(
        "--out", required=True, help="folder for adapter_config.json + adapter_model.safetensors"
    )
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--steps", type=int, default=d.steps)
    t.add_argument("--batch-size", type=int, default=d.batch_size)
    t.add_argument("--lr", type=float, default=d.lr)
    t.add_argument("--warmup", type=int, default=d.warmup)
    t.add_argument("--rank", type=int, default=d.rank)
    t.add_argument("--alpha", type=int, default=d.alpha)
    t.add_argument(
        "--targets", default=",".join(d.target_modules), help="comma-separated module names"
    )
    t.add_argument(
        "--first-layer", type=int, default=d.first_layer, help="adapters on layers >= this"
    )
    t.add_argument("--threads", type=int, default=d.threads)
    t.add_argument("--max-minutes", type=float, default=d.max_minutes)
    t.add_argument(
        "--base", default=None, help="a local checkpoint folder instead of the demo model"
    )
    et = sub.add_parser(
        "entity_tracking",
        help="LoRA-fine-tune the demo model on boxes prompts (train-split objects and labels)",
    )
    et.add_argument(
        "--out", required=True, help="folder for adapter_config.json + adapter_model.safetensors"
    )
    et.add_argument("--seed", type=int, default=b.seed)
    et.add_argument("--steps", type=int, default=b.steps)
    et.add_argument("--batch-size", type=int, default=b.batch_size)
    et.add_argument("--lr", type=float, default=b.lr)
    et.add_argument("--warmup", type=int, default=b.warmup)
    et.add_argument("--rank", type=int, default=b.rank)
    et.add_argument("--alpha", type=int, default=b.alpha)
    et.add_argument(
        "--targets", default=",".join(b.target_modules), help="comma-separated module names"
    )
    et.add_argument(
        "--first-layer", type=int, default=b.first_layer, help="adapters on layers >= this"
    )
    et.add_argument(
        "--boxes",
        default=",".join(map(str, b.boxes)),
        help="comma-separated box counts; each prompt draws one",
    )
    et.add_argument("--threads", type=int, default=b.threads)
    et.add_argument("--max-minutes", type=float, default=b.max_minutes)
    et.add_argument(
        "--base", default=None, help="a local checkpoint folder instead of the demo model"
    )
    e = sub.add_parser(
        "evaluate", help="accuracy of base vs fine-tuned; written into DIR/metadata.json"
    )
    e.add_argument("--adapter", required=True)
    e.add_argument("--n", type=int, default=200)
    e.add_argument("--seed", type=int, default=1)
    e.add_argument(
        "--task",
        choices=("arithmetic", "entity_tracking"),
        default="arithmetic",
        help="entity_tracking: accuracy at 3, 5 and 7 boxes on the test split",
    )
    args = p.parse_args(argv)
    command = "python -m circuit_widgets.finetune " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    if args.cmd == "arithmetic":
        from circuit_widgets.finetune import train_arithmetic

        recipe = ArithmeticRecipe(
            seed=args.seed,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            warmup=args.warmup,
            rank=args.rank,
            alpha=args.alpha,
            target_modules=tuple(args.targets.split(",")),
            threads=args.threads,
            first_layer=args.first_layer,
            max_minutes=args.max_minutes,
        )
        log = train_arithmetic(args.out, recipe, base_folder=args.base, command=command)
        print(
            f"saved {args.out}: {log.steps_done} steps in {log.wall_s} s"
            + (" (stopped early)" if log.interrupted else "")
        )
        return 0
    if args.cmd == "entity_tracking":
        from circuit_widgets.finetune import train_entity_tracking

        boxes = tuple(int(x) for x in args.boxes.split(","))
        recipe_b = EntityTrackingRecipe(
            seed=args.seed,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            warmup=args.warmup,
            rank=args.rank,
            alpha=args.alpha,
            target_modules=tuple(args.targets.split(",")),
            first_layer=args.first_layer,
            boxes=boxes,
            threads=args.threads,
            max_minutes=args.max_minutes,
        )
        log = train_entity_tracking(args.out, recipe_b, base_folder=args.base, command=command)
        print(
            f"saved {args.out}: {log.steps_done} steps in {log.wall_s} s"
            + (" (stopped early)" if log.interrupted else "")
        )
        return 0
    from circuit_widgets.finetune.evaluate import evaluate

    print(evaluate(args.adapter, n=args.n, seed=args.seed, task=args.task))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
