"""The report page: one self-contained HTML file (figures embedded as PNG data URIs).

Every piece of text that comes from a run (prompts, tokens, errors, model names) goes through
``esc``: a prompt may hold ``<script>``.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from circuit_widgets.report.paper import REFERENCES, fmt, rows_for


def esc(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


CSS = """
body{font:15px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1100px;
padding:1.5em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{font-variant-numeric:tabular-nums}
pre{background:#f7f7f7;border:1px solid #e3e3e3;padding:.7em;overflow-x:auto;font-size:.85em;
white-space:pre-wrap}
.status-ok{color:#1a7f37;font-weight:600}.status-failed{color:#b42318;font-weight:600}
.status-skipped,.status-incomplete{color:#9a6700;font-weight:600}
.error{background:#fff1f0;border:1px solid #f4b4ae;padding:.6em}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}.muted{color:#666;font-size:.9em}
"""


def _table(header: list[str] | None, rows: list[list[Any]], num_cols: tuple[int, ...] = ()) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header or [])
    body = "".join(
        "<tr>"
        + "".join(
            f"<td{' class=num' if i in num_cols else ''}>{esc(c)}</td>" for i, c in enumerate(r)
        )
        + "</tr>"
        for r in rows
    )
    thead = f"<thead><tr>{head}</tr></thead>" if head else ""
    return f"<table>{thead}<tbody>{body}</tbody></table>"


def _img(out: Path, rel: str, name: str) -> str:
    path = out / rel
    try:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError as e:
        return f"<p class=error>figure {esc(name)} missing: {esc(e)}</p>"
    return (
        f"<figure><img alt='{esc(name)}' src='data:image/png;base64,{data}'>"
        f"<figcaption>{esc(name)} — <a href='{esc(rel)}'>{esc(rel)}</a></figcaption></figure>"
    )


def _examples(data: dict) -> str:
    ex = data.get("examples") if isinstance(data, dict) else None
    if not ex or not isinstance(ex, list) or not isinstance(ex[0], dict):
        return ""
    cols = list(dict.fromkeys(k for e in ex for k in e))
    return "<h3>Example prompts</h3>" + _table(cols, [[_cell(e.get(c)) for c in cols] for e in ex])


def _cell(v: Any) -> str:
    return fmt(v) if isinstance(v, float) else ("" if v is None else str(v))


def _study(key: str, run: Any, out: Path) -> str:
    parts = [
        f"<section id='{esc(key)}'><h2>{esc(run.title)}</h2>",
        f"<p class=muted>Paper: {esc(REFERENCES.get(key, ''))}</p>",
        (
            f"<p>Status: <span class='status-{esc(run.status)}'>{esc(run.status)}</span>; wall time "
            f"{run.seconds:.1f} s; parameters: {esc(_params(run.params))}</p>"
        ),
    ]
    if run.error:
        parts.append(
            f"<div class=error><b>Error:</b> {esc(run.error)}"
            + (
                f"<details><summary>traceback</summary><pre>{esc(run.traceback)}</pre></details>"
                if run.traceback
                else ""
            )
            + "</div>"
        )
    if run.data is not None or run.result is not None:
        rows = rows_for(key, run.data, run.result)
        if rows:
            parts.append(
                "<h3>This model vs the paper</h3>"
                + _table(
                    ["quantity", "measured here", "paper", "paper's model / note"],
                    [list(r) for r in rows],
                    num_cols=(1, 2),
                )
            )
        if run.summary:
            parts.append(f"<h3>Summary</h3><pre>{esc(run.summary)}</pre>")
        if run.data is not None:
            parts.append(_examples(run.data))
        for name, rel in run.figures.items():
            parts.append(_img(out, rel, name))
        for e in run.figure_errors:
            parts.append(
                f"<p class={'muted' if e.startswith('no figures') else 'error'}>{esc(e)}</p>"
            )
        if run.data is not None:
            text = json.dumps(run.data, indent=1, allow_nan=False)
            parts.append(
                f"<details><summary>All numbers of this study (as in results.json)</summary>"
                f"<pre>{esc(text)}</pre></details>"
            )
    parts.append("</section>")
    return "\n".join(parts)


def _params(p: dict) -> str:
    return (
        ", ".join(
            f"{k}={v if isinstance(v, (int, float, str, bool)) or v is None else type(v).__name__}"
            for k, v in p.items()
        )
        or "defaults"
    )


def render_html(meta: dict, runs: dict, out: Path) -> str:
    """The whole page as a string."""
    shape = meta.get("model_shape") or {}
    shape_txt = (
        f"{shape.get('n_layers')} layers x {shape.get('n_heads')} heads "
        f"({shape.get('n_kv_heads')} key/value heads)"
        if "n_layers" in shape
        else ""
    )
    overview = _table(
        ["study", "status", "wall time (s)", "sizes and seed"],
        [
            [runs[k].title, runs[k].status, f"{runs[k].seconds:.1f}", _params(runs[k].params)]
            for k in runs
        ],
        num_cols=(2,),
    )
    facts: list[list[Any]] = [
        ["model", f"{meta.get('model')}: {shape_txt}" if shape_txt else meta.get("model")],
        ["model load (s)", f"{meta.get('model_load_seconds') or 0:.1f}"],
        ["fine-tuned model", meta.get("finetuned") or "none"],
        ["sizes", "quick (smallest, for CI)" if meta.get("quick") else "default"],
        ["seed", meta.get("seed")],
        ["date (UTC)", meta.get("date")],
        ["total wall time (s)", f"{meta.get('total_seconds', 0):.1f}"],
        ["torch threads", meta.get("torch_threads")],
        ["platform", meta.get("platform")],
        ["command", meta.get("command")],
    ]
    if meta.get("model_error"):
        facts.insert(1, ["model error", meta["model_error"]])
    versions = _table(
        ["package", "version"], [[k, v] for k, v in (meta.get("versions") or {}).items()]
    )
    body = "\n".join(_study(k, r, out) for k, r in runs.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(meta.get("title"))} — {esc(meta.get("model"))}</title>
<style>{CSS}</style></head><body>
<h1>{esc(meta.get("title"))}</h1>
<p class=muted>Every number on this page was measured in this run, on the model named below; the
papers' numbers stand beside them for comparison (the papers used other, larger models:
GPT-2 small/medium, LLaMA-7B and its fine-tunes). Results JSON: <a href="results.json">results.json</a>.</p>
{_table(None, facts)}
<h2>Studies</h2>
{overview}
{body}
<h2>Environment</h2>
{versions}
</body></html>
"""
