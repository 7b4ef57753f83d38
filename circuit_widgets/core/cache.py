"""Per-(model, task) activations of the clean and corrupt runs, computed once and reused.

Keys are weak: dropping a model or a task drops its entries. Each task holds at most its two
full runs (clean and corrupt). ``clear_activation_cache()`` empties everything.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import TYPE_CHECKING, Any

import torch

from circuit_widgets.core.fast_model import FastModel
from circuit_widgets.core.forward import Trace, trace_forward
from circuit_widgets.types import ModelLike

if TYPE_CHECKING:
    from circuit_widgets.tasks.base import Task

_ENGINES: weakref.WeakKeyDictionary[Any, FastModel | None] = weakref.WeakKeyDictionary()
_RUNS: weakref.WeakKeyDictionary[Any, _PerModel] = weakref.WeakKeyDictionary()
_FORCE_HOOKED = [False]


def clear_activation_cache() -> None:
    """Forget the clean/corrupt runs kept in memory between sweeps (and every model's fast-path
    check). Model weights on disk are not touched: see the README on the model cache."""
    _ENGINES.clear()
    _RUNS.clear()


clear_cache = clear_activation_cache  # the earlier name, kept working


@contextlib.contextmanager
def force_hooked(flag: bool = True):
    """Run every experiment through bridge hooks only (the generic path), e.g. to compare."""
    old = _FORCE_HOOKED[0]
    _FORCE_HOOKED[0] = flag
    try:
        yield
    finally:
        _FORCE_HOOKED[0] = old


def engine_for(model: ModelLike) -> FastModel | None:
    """The fast engine for ``model``, or None where its architecture is not covered or its
    forward does not reproduce the bridge's logits (checked once per model, on 1 prompt)."""
    if _FORCE_HOOKED[0] or _has_user_hooks(model):
        return None
    if model in _ENGINES:
        return _ENGINES[model]
    eng = FastModel.from_bridge(model)
    if eng is not None and not _agrees_with_bridge(model, eng):
        eng = None
    _ENGINES[model] = eng
    return eng


def generic_reason(model: ModelLike) -> str:
    """Why an experiment runs through bridge hooks instead of the fast engine."""
    if _FORCE_HOOKED[0]:
        return "forced (force_hooked)"
    if _has_user_hooks(model):
        return "hooks are left on the model, and only bridge forwards honour them"
    return "architecture not covered by the fast engine, or it did not reproduce the bridge"


def _has_user_hooks(model: ModelLike) -> bool:
    """Hooks left on the bridge (model.add_hook) change its forward; only hooks honour them."""
    points = getattr(model, "hook_dict", {}) or {}
    return any(hp._forward_hooks or hp._backward_hooks for hp in points.values())


def _agrees_with_bridge(model: ModelLike, eng: FastModel) -> bool:
    vocab = int(model.cfg.d_vocab)
    tokens = (torch.arange(1, 9, device=eng.device) * 7919 % max(vocab - 1, 2))[None]
    with torch.no_grad():
        ref = model(tokens)
        mine = eng.logits(trace_forward(eng, tokens).resid_pre[-1])
    tol = 1e-3 * max(1.0, float(ref.abs().max()))
    return bool(torch.isfinite(mine).all()) and float((ref - mine).abs().max()) <= tol


def _weights_version(model: ModelLike) -> tuple:
    """Changes whenever a parameter is edited in place (an ablation, a merged adapter) or a
    hook is left on the model: cached runs are then recomputed."""
    points = getattr(model, "hook_dict", {}) or {}
    user_hooks = tuple(id(fn) for hp in points.values() for fn in hp._forward_hooks.values())
    return (tuple(p._version for p in model.parameters()), user_hooks)


def _entry(model: ModelLike, task: Task) -> dict:
    version = _weights_version(model)
    per_model = _RUNS.get(model)
    if per_model is None or per_model.version != version:
        per_model = _PerModel()
        per_model.version = version
        _RUNS[model] = per_model
    entry = per_model.get(task)
    if entry is None:
        entry = {}
        per_model[task] = entry
    return entry


class _PerModel(weakref.WeakKeyDictionary):
    """task -> runs, for one version of the model's weights."""

    version: tuple = ()


def fast_run(model: ModelLike, task: Task, eng: FastModel, which: str) -> Trace:
    """The 'clean' or 'corrupt' Trace of ``task``, computed on first use."""
    entry = _entry(model, task)
    if which not in entry:
        tokens = task.clean_tokens if which == "clean" else task.corrupt_tokens
        with torch.no_grad():
            entry[which] = trace_forward(eng, tokens)
    return entry[which]


def fast_runs(model: ModelLike, task: Task, eng: FastModel) -> tuple[Trace, Trace]:
    """(clean, corrupt) Traces of ``task``, computed on first use."""
    return fast_run(model, task, eng, "clean"), fast_run(model, task, eng, "corrupt")


def fast_metric(model: ModelLike, task: Task, eng: FastModel, reader, which: str) -> torch.Tensor:
    """The task's metric per example on the cached 'clean' or 'corrupt' run."""
    entry = _entry(model, task)
    key = f"metric_{which}"
    if key not in entry:
        tr = fast_run(model, task, eng, which)
        end = task.positions["END"].to(eng.device)
        ar = torch.arange(len(task), device=eng.device)
        with torch.no_grad():
            entry[key] = reader(eng.logits(tr.resid_pre[-1][ar, end], reader.cols)).cpu()
    return entry[key]


def fast_metrics(
    model: ModelLike, task: Task, eng: FastModel, reader
) -> tuple[torch.Tensor, torch.Tensor]:
    """(metric clean, metric corrupt) per example, from the cached runs."""
    return (
        fast_metric(model, task, eng, reader, "clean"),
        fast_metric(model, task, eng, reader, "corrupt"),
    )


def set_metric(model: ModelLike, task: Task, which: str, value: torch.Tensor) -> None:
    """Record a run's metric computed elsewhere (attribution's own forward)."""
    _entry(model, task).setdefault(f"metric_{which}", value.detach().cpu())


def has_metric(model: ModelLike, task: Task, which: str) -> bool:
    return f"metric_{which}" in _entry(model, task)


def hooked_runs(model: ModelLike, task: Task) -> tuple[dict, dict, torch.Tensor, torch.Tensor]:
    """(clean cache, corrupt cache, metric clean, metric corrupt) through bridge hooks."""
    entry = _entry(model, task)
    if "hooked" not in entry:
        entry["hooked"] = hooked_compute(model, task)
    return entry["hooked"]


def hooked_compute(model: ModelLike, task: Task) -> tuple[dict, dict, torch.Tensor, torch.Tensor]:
    keep = (
        "hook_z",
        "hook_q",
        "hook_k",
        "hook_v",
        "hook_pattern",
        "hook_attn_out",
        "hook_mlp_out",
        "hook_resid_pre",
    )
    caches, metrics = [], []
    with torch.no_grad():
        for tokens in (task.clean_tokens, task.corrupt_tokens):
            logits, cache = model.run_with_cache(
                tokens.to(model.cfg.device), names_filter=lambda n: n.endswith(keep)
            )
            caches.append({k: v for k, v in cache.items()})
            metrics.append(task.metric(logits).cpu())
    return (caches[0], caches[1], metrics[0], metrics[1])


# ---------------------------------------------------------------------- per chunk


def chunk_run(model: ModelLike, chunk: Any, eng: FastModel, which: str) -> Trace:
    """The chunk's 'clean' or 'corrupt' Trace: the cached whole-task run when the chunk is the
    whole task, else computed for the chunk alone and never cached (it goes with the chunk)."""
    if chunk.whole:
        return fast_run(model, chunk.task, eng, which)

    def make() -> Trace:
        tokens = chunk.task.clean_tokens if which == "clean" else chunk.task.corrupt_tokens
        with torch.no_grad():
            return trace_forward(eng, tokens)

    return chunk.get(f"run_{which}_{id(model)}", make)


def chunk_metric(model: ModelLike, chunk: Any, eng: FastModel, reader, which: str) -> torch.Tensor:
    """The task's metric per example of the chunk's 'clean' or 'corrupt' run."""
    if chunk.whole:
        return fast_metric(model, chunk.task, eng, reader, which)

    def make() -> torch.Tensor:
        tr = chunk_run(model, chunk, eng, which)
        end = chunk.task.positions["END"].to(eng.device)
        ar = torch.arange(len(chunk.task), device=eng.device)
        with torch.no_grad():
            return reader(eng.logits(tr.resid_pre[-1][ar, end], reader.cols)).cpu()

    return chunk.get(f"metric_{which}_{id(model)}", make)


def chunk_hooked_runs(
    model: ModelLike, chunk: Any
) -> tuple[dict, dict, torch.Tensor, torch.Tensor]:
    """hooked_runs for a chunk: cached for the whole task, else for the chunk alone."""
    if chunk.whole:
        return hooked_runs(model, chunk.task)
    return chunk.get(f"hooked_{id(model)}", lambda: hooked_compute(model, chunk.task))
