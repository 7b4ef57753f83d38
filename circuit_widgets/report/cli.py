"""Command line: python -m circuit_widgets.report --out DIR [--model demo] [--finetuned demo-arith]
[--quick] [--only ioi,reuse,entity,finetune]."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from circuit_widgets.report.build import STUDIES, build_report


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m circuit_widgets.report",
        description="Run the replication studies on one model and write DIR/index.html, "
        "DIR/results.json and DIR/figures/*.png.",
    )
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--model", default="demo", help="model for load_model (default: demo)")
    p.add_argument(
        "--finetuned",
        default="demo-arith",
        help="fine-tuned model for the finetune study (default: demo-arith; 'none' skips it)",
    )
    p.add_argument("--quick", action="store_true", help="the smallest sizes (for CI)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(STUDIES)}")
    p.add_argument("--seed", type=int, default=0, help="seed of every task (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns 0 when every chosen study ran (or was skipped), 1 otherwise."""
    args = _parser().parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("--threads must be >= 1")
        import torch

        torch.set_num_threads(args.threads)
    finetuned = None if str(args.finetuned).lower() in ("", "none") else args.finetuned
    try:
        report = build_report(
            args.out,
            model=args.model,
            finetuned=finetuned,
            quick=args.quick,
            only=args.only,
            seed=args.seed,
            progress=not args.no_progress,
            command=" ".join(
                ["python -m circuit_widgets.report", *(sys.argv[1:] if argv is None else argv)]
            ),
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for key, run in report.runs.items():
        extra = f" ({run.error})" if run.error else ""
        print(f"{key:9s} {run.status:10s} {run.seconds:7.1f} s{extra}")
    print(f"wrote {report.index} and {report.results_json} in {report.seconds:.0f} s")
    return 0 if report.ok else 1
