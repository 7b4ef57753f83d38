"""Run the studies one by one (a failure is recorded, the rest still run) and write the report:
index.html, results.json and the figures as PNGs."""

from __future__ import annotations

import datetime
import json
import math
import platform
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from circuit_widgets.report.paper import TITLES
from circuit_widgets.types import Head

STUDIES = ("ioi", "reuse", "entity", "finetune")


@dataclass(frozen=True)
class _Sizes:
    """A study's keyword arguments that the report sets; None leaves the study's own default."""

    def given(self) -> dict[str, Any]:
        """The fields that are set, by name (each one a keyword of the study function)."""
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }


@dataclass(frozen=True)
class IOISizes(_Sizes):
    """Keywords of ``ioi_study``."""

    n: int | None = None
    top_frac: float | None = None
    task: Any = None


@dataclass(frozen=True)
class ReuseSizes(_Sizes):
    """Keywords of ``circuit_reuse``."""

    n: int | None = None
    top_frac: float | None = None
    n_eval: int | None = None
    n_controls: int | None = None
    n_random: int | None = None
    intervention_heads: Any = None


@dataclass(frozen=True)
class EntitySizes(_Sizes):
    """Keywords of ``entity_tracking_study``."""

    n: int | None = None
    n_boxes: int | None = None
    top_k: int | None = None
    n_random: int | None = None
    dcm_examples: int | None = None
    dcm_epochs: int | None = None


@dataclass(frozen=True)
class FinetuneSizes(_Sizes):
    """Keywords of ``finetuning_study``."""

    n: int | None = None
    n_boxes: int | None = None
    top_k: int | None = None
    arithmetic_n: int | None = None
    grid_n: int | None = None


SIZE_TYPES: dict[str, type[_Sizes]] = {
    "ioi": IOISizes,
    "reuse": ReuseSizes,
    "entity": EntitySizes,
    "finetune": FinetuneSizes,
}

# Full runs use each study's own defaults (the same as a notebook's full mode). QUICK: the
# smallest sizes that still run every step (CI).
DEFAULT_SIZES: dict[str, _Sizes] = {k: t() for k, t in SIZE_TYPES.items()}
QUICK_SIZES: dict[str, _Sizes] = {
    "ioi": IOISizes(n=8),
    "reuse": ReuseSizes(n=8, n_eval=24, n_controls=10, n_random=1),
    "entity": EntitySizes(n=8, n_random=1, dcm_examples=6),
    "finetune": FinetuneSizes(n=8),
}


def _sizes(key: str, base: _Sizes, override: dict[str, Any] | _Sizes | None) -> _Sizes:
    """``base`` with the fields of ``override`` (a dict or the study's sizes dataclass) set."""
    if override is None:
        return base
    if isinstance(override, _Sizes):
        override = override.given()
    if not isinstance(override, dict):
        raise ValueError(  # noqa: TRY004 - every input mistake is a ValueError
            f"sizes[{key!r}] must be a dict or {SIZE_TYPES[key].__name__}, got {override!r}"
        )
    known = [f.name for f in fields(SIZE_TYPES[key])]
    bad = sorted(set(override) - set(known))
    if bad:
        raise ValueError(
            f"sizes[{key!r}] names {bad}, which the report does not set; it sets {known}"
        )
    return replace(base, **override)


PACKAGES = (
    "circuit-widgets",
    "torch",
    "transformer-lens",
    "transformers",
    "peft",
    "numpy",
    "matplotlib",
    "tqdm",
)


@dataclass
class StudyRun:
    """One study's outcome: status 'ok' | 'incomplete' | 'failed' | 'skipped'."""

    key: str
    title: str
    status: str
    seconds: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)
    result: Any = None
    data: dict | None = None
    summary: str = ""
    error: str | None = None
    traceback: str | None = None
    figures: dict[str, str] = field(default_factory=dict)  # name -> PNG path relative to out
    figure_errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "title": self.title,
            "status": self.status,
            "seconds": self.seconds,
            "params": _jsonable(self.params),
            "result": self.data,
            "summary": self.summary,
            "error": self.error,
            "traceback": self.traceback,
            "figures": dict(self.figures),
            "figure_errors": list(self.figure_errors),
        }


@dataclass
class Report:
    """What ``build_report`` wrote and measured."""

    out: Path
    index: Path
    results_json: Path
    runs: dict[str, StudyRun]
    meta: dict[str, Any]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(r.status in ("ok", "skipped") for r in self.runs.values())


# ---------------------------------------------------------------- helpers


def _jsonable(x: Any) -> Any:
    """Plain JSON: NaN/inf -> null, tensors -> lists, heads and other objects -> str."""
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (set, frozenset)):
        return sorted(_jsonable(v) for v in x)
    if hasattr(x, "tolist"):
        return _jsonable(x.tolist())
    if isinstance(x, (Path, Head)):
        return str(x)
    # A task or a model given as a parameter: its kind and name, not a repr full of tensors.
    return f"{type(x).__name__} {getattr(x, 'name', '')}".strip()


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = "not installed"
    return out


def _model_label(model: Any, given: Any) -> str:
    if isinstance(given, str):
        return given
    cfg = getattr(model, "cfg", None)
    return str(getattr(cfg, "model_name", None) or type(model).__name__)


def _shape(model: Any) -> dict[str, Any]:
    from circuit_widgets.models import model_shape

    try:
        s = model_shape(model)
    except Exception as e:  # noqa: BLE001 - the page shows whatever could be read
        return {"error": str(e)}
    return {
        "n_layers": s.n_layers,
        "n_heads": s.n_heads,
        "n_kv_heads": s.n_kv_heads,
        "d_head": s.d_head,
    }


class _Bar:
    """A tqdm bar fed by on_progress(done, total); a no-op when progress is off."""

    def __init__(self, desc: str, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=1, desc=desc, unit="step", leave=True, dynamic_ncols=True)

    def __call__(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.total = max(int(total), 1)
            self.bar.n = min(int(done), self.bar.total)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------- the studies


def _run_ioi(ctx: dict, p: IOISizes, seed: int, on_progress, should_stop) -> Any:
    from circuit_widgets.studies import ioi as study

    reuse = ctx["results"].get("reuse")
    n = study.DEFAULT_N if p.n is None else p.n
    top_frac = study.DEFAULT_TOP_FRAC if p.top_frac is None else p.top_frac
    # The reuse study ran the same pipeline on the same IOI prompts: use it rather than rerun it.
    same = (
        reuse is not None
        and reuse.complete
        and p.task is None
        and (reuse.n, reuse.seed, reuse.top_frac) == (n, seed, top_frac)
    )
    return study.ioi_study(
        ctx["model"],
        n=n,
        seed=seed,
        top_frac=top_frac,
        task=p.task,
        pipeline=reuse.ioi if same else None,
        on_progress=on_progress,
        should_stop=should_stop,
    )


def _run_reuse(ctx: dict, p: ReuseSizes, seed: int, on_progress, should_stop) -> Any:
    from circuit_widgets.studies.reuse import circuit_reuse

    return circuit_reuse(
        ctx["model"], seed=seed, **p.given(), on_progress=on_progress, should_stop=should_stop
    )


def _run_entity(ctx: dict, p: EntitySizes, seed: int, on_progress, should_stop) -> Any:
    from circuit_widgets.studies.entity_tracking import entity_tracking_study

    return entity_tracking_study(
        ctx["model"], seed=seed, **p.given(), on_progress=on_progress, should_stop=should_stop
    )


def _run_finetune(ctx: dict, p: FinetuneSizes, seed: int, on_progress, should_stop) -> Any:
    finetuned = ctx["load_finetuned"]()
    from circuit_widgets.studies.finetuning import finetuning_study

    kw = p.given()
    et = ctx["results"].get("entity")
    # The entity study found the base model's circuit: CMAP it on its very prompts, don't refind it.
    shared = {k: getattr(et, k, None) for k in ("n", "n_boxes", "top_k")} if et is not None else {}
    if (
        et is not None
        and et.complete
        and None not in shared.values()
        and all(kw.get(k, v) == v for k, v in shared.items())
    ):
        kw = {**kw, **shared, "circuit": et.circuit}
    return finetuning_study(
        ctx["model"], finetuned, seed=seed, **kw, on_progress=on_progress, should_stop=should_stop
    )


def _ran(params: dict[str, Any], result: Any) -> dict[str, Any]:
    """The parameters a study ran with: those given, with what its result records (n of a
    given task, n_eval after dropping repeats, ...) in place of the request."""
    out = dict(params)
    for k in ("n", "seed", "top_frac", "n_eval", "n_boxes", "top_k"):
        v = getattr(result, k, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = v
    task = params.get("task")
    if task is not None:
        out["task"] = f"{getattr(task, 'name', type(task).__name__)} ({len(task)} prompts)"
    return out


RUNNERS: dict[str, Callable] = {
    "ioi": _run_ioi,
    "reuse": _run_reuse,
    "entity": _run_entity,
    "finetune": _run_finetune,
}
# Reuse runs before IOI so that IOI can take its pipeline; the page keeps the order of STUDIES.
RUN_ORDER = ("reuse", "ioi", "entity", "finetune")


def _parse_only(only: str | Iterable[str] | None) -> list[str]:
    if only is None:
        return list(STUDIES)
    names = [x.strip() for x in (only.split(",") if isinstance(only, str) else only)]
    names = [x for x in names if x]
    bad = [x for x in names if x not in STUDIES]
    if bad or not names:
        raise ValueError(f"unknown studies {bad or names!r}; choose from {', '.join(STUDIES)}")
    return [s for s in STUDIES if s in names]


def _save_figures(run: StudyRun, out: Path, dpi: int) -> None:
    figs_fn = getattr(run.result, "figures", None)
    if not callable(figs_fn):
        run.figure_errors.append(f"no figures: {type(run.result).__name__} has no figures()")
        return
    try:
        from circuit_widgets.plots import figure_bytes

        figs = figs_fn()
    except Exception as e:  # noqa: BLE001 - a figure failure must not lose the numbers
        run.figure_errors.append(f"figures() failed: {type(e).__name__}: {e}")
        return
    folder = out / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    for name, fig in figs.items():
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(name)) or "figure"
        path = (
            folder / f"{run.key}_{safe}.png"
            if not safe.startswith(run.key)
            else folder / f"{safe}.png"
        )
        try:
            path.write_bytes(figure_bytes(fig, "png", dpi=dpi))
        except Exception as e:  # noqa: BLE001
            run.figure_errors.append(f"figure {name!r}: {type(e).__name__}: {e}")
            continue
        run.figures[str(name)] = str(path.relative_to(out))


# ---------------------------------------------------------------- entry point


def build_report(
    out: str | Path,
    *,
    model: Any = "demo",
    finetuned: Any = "demo-arith",
    quick: bool = False,
    only: str | Iterable[str] | None = None,
    seed: int = 0,
    sizes: dict[str, dict[str, Any] | _Sizes] | None = None,
    progress: bool = False,
    figures: bool = True,
    dpi: int = 90,
    should_stop: Callable[[], bool] | None = None,
    command: str | None = None,
) -> Report:
    """Run the studies and write ``out``/index.html, results.json and figures/*.png.

    model: a name for ``load_model`` ("demo", a local folder, a hub name) or a loaded model;
    finetuned: the fine-tuned model for the "finetune" study (a name, a model, or None: that
    study is then skipped). quick: the smallest sizes (QUICK_SIZES), else DEFAULT_SIZES;
    ``sizes`` overrides per study ({"ioi": {"n": 4}} or {"ioi": IOISizes(n=4)}; the fields of
    IOISizes, ReuseSizes, EntitySizes, FinetuneSizes, e.g. {"ioi": {"task": my_task}}). The
    metadata records what each study ran with (e.g. n of a given task), from its result. only: "ioi,reuse" or a list, from STUDIES. progress:
    a tqdm bar per study. figures: render each study's ``figures()`` (PNG files, embedded in
    the page at ``dpi``); False leaves them out. A study that raises is recorded with its error and traceback and
    the others still run; ``should_stop()`` stops the running study (kept, marked incomplete)
    and skips the rest.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")  # noqa: TRY004 - every input mistake is a ValueError
    chosen = _parse_only(only)
    sizes = dict(sizes or {})
    bad = sorted(set(sizes) - set(STUDIES))
    if bad:
        raise ValueError(f"sizes names unknown studies {bad}; choose from {', '.join(STUDIES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    started = datetime.datetime.now(datetime.timezone.utc)
    base = QUICK_SIZES if quick else DEFAULT_SIZES
    study_sizes = {k: _sizes(k, base[k], sizes.get(k)) for k in STUDIES}

    runs: dict[str, StudyRun] = {}
    load_error: str | None = None
    load_tb: str | None = None
    load_seconds = 0.0
    loaded = model
    if isinstance(model, (str, Path)):
        from circuit_widgets.models import load_model

        t = time.perf_counter()
        try:
            loaded = load_model(str(model))
        except Exception as e:  # noqa: BLE001 - every study reports this error
            loaded, load_error, load_tb = None, f"{type(e).__name__}: {e}", traceback.format_exc()
        load_seconds = time.perf_counter() - t
    ft_cache: dict[str, Any] = {}

    def load_finetuned() -> Any:
        if finetuned is None:
            raise ValueError("no fine-tuned model given (--finetuned NAME)")
        if not isinstance(finetuned, (str, Path)):
            return finetuned
        if "model" not in ft_cache:
            from circuit_widgets.models import load_model

            t = time.perf_counter()
            ft_cache["model"] = load_model(str(finetuned))
            ft_cache["seconds"] = time.perf_counter() - t
        return ft_cache["model"]

    ctx: dict[str, Any] = {"model": loaded, "load_finetuned": load_finetuned, "results": {}}
    stop_all = False
    for key in RUN_ORDER:
        if key not in chosen:
            continue
        params = {"seed": seed, **study_sizes[key].given()}
        run = StudyRun(key, TITLES[key], "skipped", params=params)
        runs[key] = run
        if loaded is None:
            run.status, run.error, run.traceback = (
                "failed",
                f"model {model!r} did not load: {load_error}",
                load_tb,
            )
            continue
        if stop_all:
            run.error = "stopped before this study started"
            continue
        if key == "finetune" and finetuned is None:
            run.error = "no fine-tuned model given (--finetuned NAME): nothing to compare"
            continue
        bar = _Bar(key, progress)
        t = time.perf_counter()
        try:
            res = RUNNERS[key](ctx, study_sizes[key], seed, bar, should_stop)
        except Exception as e:  # noqa: BLE001 - a failing study is reported, the others run
            run.status, run.error, run.traceback = (
                "failed",
                f"{type(e).__name__}: {e}",
                traceback.format_exc(),
            )
            run.seconds = time.perf_counter() - t
            bar.close()
            continue
        bar.close()
        run.seconds = time.perf_counter() - t
        run.result = res
        run.params = _ran(params, res)
        ctx["results"][key] = res
        run.status = "ok" if getattr(res, "complete", True) else "incomplete"
        try:
            run.data = _jsonable(res.to_dict())
        except Exception as e:  # noqa: BLE001
            run.error = f"to_dict() failed: {type(e).__name__}: {e}"
        try:
            run.summary = str(res.summary())
        except Exception as e:  # noqa: BLE001
            run.summary = f"summary() failed: {type(e).__name__}: {e}"
        if figures:
            _save_figures(run, out, dpi)
        if should_stop is not None and should_stop():
            stop_all = True

    ordered = {k: runs[k] for k in STUDIES if k in runs}
    meta = {
        "title": "circuit_widgets replication report",
        "date": started.isoformat(timespec="seconds"),
        "model": _model_label(loaded, model),
        "model_shape": _shape(loaded) if loaded is not None else {},
        "model_load_seconds": load_seconds,
        "model_error": load_error,
        # Only a study that used the fine-tuned model names it.
        "finetuned": (
            None
            if finetuned is None or "finetune" not in chosen
            else _model_label(finetuned, finetuned)
        ),
        "finetuned_load_seconds": ft_cache.get("seconds"),
        "quick": bool(quick),
        "seed": seed,
        "studies": list(chosen),
        "sizes": {k: _jsonable(r.params) for k, r in ordered.items()},
        "seconds": {k: r.seconds for k, r in ordered.items()},
        "versions": _versions(),
        "platform": platform.platform(),
        "torch_threads": _threads(),
        "command": command or " ".join([Path(sys.executable).name, *sys.argv]),
    }
    meta["total_seconds"] = time.perf_counter() - t0
    results_json = out / "results.json"
    payload = {"meta": _jsonable(meta), "studies": {k: r.to_dict() for k, r in ordered.items()}}
    results_json.write_text(json.dumps(payload, indent=1, allow_nan=False), encoding="utf-8")
    from circuit_widgets.report.render import render_html

    index = out / "index.html"
    index.write_text(render_html(meta, ordered, out), encoding="utf-8")
    return Report(
        out=out,
        index=index,
        results_json=results_json,
        runs=ordered,
        meta=meta,
        seconds=time.perf_counter() - t0,
    )


def _threads() -> int | None:
    try:
        import torch

        return torch.get_num_threads()
    except Exception:  # noqa: BLE001
        return None
