"""``python -m circuit_widgets.finetune arithmetic|entity_tracking --out DIR [--steps N ...]``
and ``evaluate``."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any


def _add_lora_args(parser: argparse.ArgumentParser, d: Any) -> None:
    """The options every LoRA recipe takes, defaulting to recipe ``d``'s values."""
    parser.add_argument(
        "--out", required=True, help="folder for adapter_config.json + adapter_model.safetensors"
    )
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--warmup", type=int, default=d.warmup)
    parser.add_argument("--rank", type=int, default=d.rank)
    parser.add_argument("--alpha", type=int, default=d.alpha)
    parser.add_argument(
        "--targets", default=",".join(d.target_modules), help="comma-separated module names"
    )
    parser.add_argument(
        "--first-layer", type=int, default=d.first_layer, help="adapters on layers >= this"
    )
    parser.add_argument("--threads", type=int, default=d.threads)
    parser.add_argument("--max-minutes", type=float, default=d.max_minutes)
    parser.add_argument(
        "--base", default=None, help="a local checkpoint folder instead of the demo model"
    )


def _lora_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup": args.warmup,
        "rank": args.rank,
        "alpha": args.alpha,
        "target_modules": tuple(args.targets.split(",")),
        "first_layer": args.first_layer,
        "threads": args.threads,
        "max_minutes": args.max_minutes,
    }


def main(argv: list[str] | None = None) -> int:
    from circuit_widgets.finetune import ArithmeticRecipe, EntityTrackingRecipe

    p = argparse.ArgumentParser(prog="python -m circuit_widgets.finetune")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("arithmetic", help="LoRA-fine-tune the demo model on Goat-style arithmetic")
    _add_lora_args(t, ArithmeticRecipe())
    et = sub.add_parser(
        "entity_tracking",
        help="LoRA-fine-tune the demo model on boxes prompts (train-split objects and labels)",
    )
    _add_lora_args(et, EntityTrackingRecipe())
    et.add_argument(
        "--boxes",
        default=",".join(map(str, EntityTrackingRecipe().boxes)),
        help="comma-separated box counts; each prompt draws one",
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

        recipe = ArithmeticRecipe(**_lora_kwargs(args))
        log = train_arithmetic(args.out, recipe, base_folder=args.base, command=command)
        print(
            f"saved {args.out}: {log.steps_done} steps in {log.wall_s} s"
            + (" (stopped early)" if log.interrupted else "")
        )
        return 0
    if args.cmd == "entity_tracking":
        from circuit_widgets.finetune import train_entity_tracking

        boxes = tuple(int(x) for x in args.boxes.split(","))
        recipe_b = EntityTrackingRecipe(**_lora_kwargs(args), boxes=boxes)
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
