"""The papers' numbers, and the rows of "this model vs the paper" tables built from a study's
``to_dict()``. Paper numbers come from shared/reference/SEEDS.md (and Wang et al. 2022 for IOI)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

# (quantity, measured, paper value, paper model / note)
Row = tuple[str, str, str, str]

TITLES = {
    "ioi": "IOI circuit by path patching (Wang et al. 2022, as run by Merullo et al.)",
    "reuse": "Circuit reuse: IOI vs Colored Objects, and the attention intervention (Merullo et al.)",
    "entity": "Entity tracking: circuit groups A-D, faithfulness, DCM (Prakash et al.)",
    "finetune": "Base vs fine-tuned model: CMAP per group (Prakash et al.)",
}

REFERENCES = {
    "ioi": "Wang et al. 2022, Interpretability in the Wild (GPT-2 small); Merullo et al. ICLR 2024 "
    "(GPT-2 medium, top 2% of heads per stage)",
    "reuse": "Merullo, Eickhoff, Pavlick, Circuit Component Reuse Across Tasks in Transformer "
    "Language Models, ICLR 2024 (GPT-2 medium, 24 x 16 heads)",
    "entity": "Prakash et al., Fine-Tuning Enhances Existing Mechanisms: A Case Study on Entity "
    "Tracking, ICLR 2024 (LLaMA-7B)",
    "finetune": "Prakash et al., ICLR 2024: LLaMA-7B vs Goat-7B / FLoat-7B (arithmetic fine-tunes)",
}


def fmt(x: Any, kind: str = "num") -> str:
    """A measured value as text: percentages, numbers, counts; n/a where missing or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, (list, tuple)):
        return ", ".join(str(v) for v in x) or "none"
    if not isinstance(x, (int, float)):
        return str(x)
    if kind == "pct":
        return f"{x:.1%}"
    if kind == "int":
        return str(int(x))
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def get(d: Any, *path: Any, default: Any = None) -> Any:
    """d[path[0]][path[1]]..., or ``default`` where any step is missing."""
    for p in path:
        in_dict = isinstance(d, dict) and p in d
        in_list = isinstance(d, (list, tuple)) and isinstance(p, int) and -len(d) <= p < len(d)
        if in_dict or in_list:
            d = d[p]
        else:
            return default
        if d is None:
            return default
    return d


def first(d: dict, *paths: tuple) -> Any:
    """The first of several key paths present in ``d`` (results of colleagues' studies may name keys differently)."""
    for p in paths:
        v = get(d, *p)
        if v is not None:
            return v
    return None


def ioi_rows(d: dict) -> list[Row]:
    classes = d.get("head_classes") or {}
    paper_ex = get(d, "paper", "examples", default={})
    rows: list[Row] = [
        (
            "accuracy (argmax over the vocabulary = IO)",
            fmt(d.get("accuracy"), "pct"),
            "—",
            "not reported",
        ),
        ("IO beats S", fmt(d.get("candidate_accuracy"), "pct"), "—", "not reported"),
        (
            "logit diff logit(IO) - logit(S)",
            fmt(d.get("logit_diff")),
            "3.56",
            "GPT-2 small (Wang et al.)",
        ),
        ("logit diff on corrupt (ABC) prompts", fmt(d.get("corrupt_logit_diff")), "—", ""),
        (
            "circuit heads (unique; 4 stages, top 2% each)",
            fmt(d.get("n_circuit_heads"), "int"),
            "32",
            "GPT-2 medium, same procedure (Merullo et al.)",
        ),
        ("circuit heads, by hand", "—", "26 in 7 classes", "GPT-2 small (Wang et al.)"),
    ]
    labels = {
        "name_mover": "name movers",
        "negative_mover": "negative name movers",
        "s_inhibition": "S-inhibition heads",
        "induction": "induction heads",
        "duplicate_token": "duplicate-token heads",
        "previous_token": "previous-token heads",
    }
    for key, label in labels.items():
        hs = classes.get(key) or []
        rows.append(
            (
                label,
                f"{len(hs)}: {', '.join(hs)}" if hs else "0",
                ", ".join(paper_ex.get(key, [])) or "—",
                "GPT-2 small (Wang et al.), e.g.",
            )
        )
    return rows


def reuse_rows(d: dict) -> list[Row]:
    o = d.get("overlap") or {}
    iv = d.get("intervention") or {}
    rows: list[Row] = [
        ("IOI circuit heads", fmt(o.get("n_a"), "int"), "32", "GPT-2 medium"),
        ("Colored Objects circuit heads", fmt(o.get("n_b"), "int"), "—", ""),
        (
            "IOI heads reused by Colored Objects",
            fmt(o.get("n_shared"), "int"),
            "25",
            "GPT-2 medium",
        ),
        ("share of the IOI circuit reused", fmt(o.get("frac_a"), "pct"), "78%", "GPT-2 medium"),
        (
            "Colored Objects accuracy (argmax over the vocabulary), circuit prompts",
            fmt(d.get("colored_accuracy"), "pct"),
            "49.6%",
            "GPT-2 medium",
        ),
        (
            "heads intervened on (roles from what they do)",
            ", ".join(
                f"{h} {get(iv, 'roles', h, 'role', default='')}".strip()
                for h in iv.get("heads") or []
            )
            or "none",
            "3 S-inhibition + 19.1",
            "GPT-2 medium",
        ),
        (
            f"held-out accuracy among the 3 colours, before -> after ({fmt(iv.get('n_eval'), 'int')} prompts)",
            f"{fmt(iv.get('accuracy_before'), 'pct')} -> {fmt(iv.get('accuracy_after'), 'pct')}",
            "—",
            "the paper's 49.6% -> 93.7%: next row",
        ),
        (
            "held-out accuracy over the vocabulary, before -> after",
            f"{fmt(iv.get('vocab_accuracy_before'), 'pct')} -> {fmt(iv.get('vocab_accuracy_after'), 'pct')}",
            "49.6% -> 93.7%",
            "GPT-2 medium",
        ),
        (
            f"control: {len(iv.get('random_after') or [])} random head sets, same layers (mean ± sd)",
            f"{fmt(iv.get('random_mean'), 'pct')} ± {fmt(iv.get('random_std'), 'pct')}",
            "—",
            "not reported",
        ),
        (
            "control: the same heads forced onto all three colours",
            fmt(iv.get("all_colors_after"), "pct"),
            "—",
            "not reported",
        ),
        (
            "movers' attention to the wrong colours (before -> after)",
            (
                f"{fmt(iv.get('mover_attention_to_wrong_before_mean'))} -> "
                f"{fmt(iv.get('mover_attention_to_wrong_after_mean'))}"
            ),
            "decreases",
            "GPT-2 medium",
        ),
    ]
    for key, label in (("ioi_faithfulness", "IOI"), ("colored_faithfulness", "Colored Objects")):
        f = d.get(key)
        if f:
            rows.append(
                (
                    f"{label} circuit faithfulness ({f.get('metric_name', 'metric')})",
                    (
                        f"{fmt(f.get('circuit_metric'))} / {fmt(f.get('full_metric'))} = "
                        f"{fmt(f.get('ratio'))} (random circuits {fmt(f.get('random_metric_mean'))})"
                    ),
                    "—",
                    "",
                )
            )
    return rows


def entity_rows(d: dict) -> list[Row]:
    f = d.get("faithfulness") or {}
    sizes = d.get("group_sizes") or {}
    rows: list[Row] = [
        ("accuracy (argmax over the vocabulary)", fmt(d.get("accuracy"), "pct"), "66%", "LLaMA-7B"),
        ("accuracy among the in-context objects", fmt(d.get("candidate_accuracy"), "pct"), "—", ""),
        ("chance among the boxes", fmt(d.get("chance"), "pct"), "14%", "7 boxes"),
        (
            "faithfulness, accuracy: circuit / full model",
            (
                f"{fmt(f.get('circuit_accuracy'), 'pct')} / {fmt(f.get('full_accuracy'), 'pct')} = "
                f"{fmt(f.get('accuracy_ratio'))}"
            ),
            "66% / 66% = 1.00",
            "LLaMA-7B (mean ablation)",
        ),
        (
            f"faithfulness, {f.get('metric_name', 'metric')}: circuit / full model",
            f"{fmt(f.get('circuit_metric'))} / {fmt(f.get('full_metric'))} = {fmt(f.get('ratio'))}",
            "—",
            "",
        ),
        (
            "random circuits of the same size, accuracy",
            fmt(f.get("random_accuracy_mean"), "pct"),
            "~0%",
            "LLaMA-7B",
        ),
    ]
    paper_sizes = {"A": "40", "B": "7", "C": "20", "D": "5"}
    for g in "ABCD":
        rows.append(
            (
                f"group {g} heads",
                fmt(sizes.get(g), "int"),
                paper_sizes[g],
                "LLaMA-7B (top-k, then pruned)",
            )
        )
    for g, per in (d.get("dcm") or {}).items():
        for kind, r in (per or {}).items():
            rows.append(
                (
                    f"DCM group {g}, {kind}: heads selected (test accuracy)",
                    (
                        f"{fmt(r.get('n_selected'), 'int')}/{len(r.get('heads') or [])} "
                        f"({fmt(r.get('test_accuracy'), 'pct')})"
                    ),
                    "carries it" if kind.startswith("pos") else "does not",
                    "LLaMA-7B: groups carry the box's position, not object or label",
                )
            )
    return rows


def finetune_rows(d: dict) -> list[Row]:
    ar = d.get("arithmetic_accuracy") or {}
    et = d.get("entity_tracking_accuracy") or {}
    cm = d.get("cmap") or {}
    rows: list[Row] = [
        (
            "arithmetic accuracy, base -> fine-tuned",
            f"{fmt(ar.get('base'), 'pct')} -> {fmt(ar.get('finetuned'), 'pct')}",
            "—",
            "Goat-7B: arithmetic LoRA",
        ),
        ("entity-tracking accuracy, base", fmt(et.get("base"), "pct"), "66%", "LLaMA-7B"),
        ("entity-tracking accuracy, fine-tuned", fmt(et.get("finetuned"), "pct"), "82%", "Goat-7B"),
    ]
    paper = {"circuit": "82%", "A": "82%", "B": "78%", "C": "62%", "D": "65%"}
    for g in ("circuit", "A", "B", "C", "D"):
        label = "whole circuit" if g == "circuit" else f"group {g} alone"
        rows.append(
            (
                f"CMAP (fine-tuned heads into the base), {label}",
                fmt((cm.get(g) or {}).get("patched_accuracy"), "pct"),
                paper[g],
                "Goat -> LLaMA",
            )
        )
    return rows


ROWS: dict[str, Callable[[dict], list[Row]]] = {
    "ioi": ioi_rows,
    "reuse": reuse_rows,
    "entity": entity_rows,
    "finetune": finetune_rows,
}


def rows_for(key: str, data: dict | None, result: Any = None) -> list[Row]:
    """The comparison table of one study: the result's own ``paper_comparison()`` if it has
    one, else the rows built here from its ``to_dict()``."""
    own = getattr(result, "paper_comparison", None)
    if callable(own):
        out: list[Row] = []
        for r in own():
            r = (
                tuple(r)
                if not isinstance(r, dict)
                else (
                    r.get("quantity", ""),
                    r.get("measured", ""),
                    r.get("paper", ""),
                    r.get("note", ""),
                )
            )
            q, m, p, n = (
                fmt(x) if not isinstance(x, str) else x for x in (list(r) + ["", "", "", ""])[:4]
            )
            out.append((q, m, p, n))
        return out
    if data is None or key not in ROWS:
        return []
    return ROWS[key](data)
