"""Argument-type checks for the public entry points: say what was expected and what came.

Duck-typed on what the code reads, so any model with the model protocol (a ``cfg`` with the
sizes and a ``tokenizer``) passes, not only a TransformerBridge.
"""

from __future__ import annotations

from typing import Any

_TASK_GENERATORS = ("ioi", "colored_objects", "entity_tracking", "arithmetic")
_TASK_FIELDS = ("clean_tokens", "corrupt_tokens", "positions")
_DESIDERATUM_FIELDS = ("base_tokens", "source_tokens", "targets")


def _got(obj: Any) -> str:
    """The offending value, short: its type and, for small values, the value itself."""
    text = repr(obj)
    if len(text) > 60:
        return f"a {type(obj).__name__}"
    return f"the {type(obj).__name__} {text}"


def check_model(obj: Any, where: str, name: str = "model") -> None:
    """A loaded model: a ``cfg`` with ``n_layers`` and ``n_heads``, and a ``tokenizer``."""
    if isinstance(obj, str):
        raise TypeError(
            f"{where}: {name} must be a loaded model, got the string {obj!r}; load it first: "
            f'{name} = cw.load_model("{obj}") (e.g. cw.load_model("demo"))'
        )
    if callable(getattr(obj, "get_base_model", None)):  # a peft wrapper around a loaded model
        obj = obj.get_base_model()
    cfg = getattr(obj, "cfg", None)
    if (
        cfg is None
        or not hasattr(cfg, "n_layers")
        or not hasattr(cfg, "n_heads")
        or not hasattr(obj, "tokenizer")
    ):
        raise TypeError(
            f'{where}: {name} must be a loaded model (a TransformerBridge from cw.load_model("demo"), '
            f"or any model with .cfg.n_layers, .cfg.n_heads and .tokenizer), got {_got(obj)}"
        )


def check_task(obj: Any, where: str, name: str = "task") -> None:
    """A Task (clean and corrupted tokens with named positions), not its name or a Desideratum."""
    if all(hasattr(obj, f) for f in _TASK_FIELDS):
        return
    hint = "e.g. cw.tasks.ioi(model, n=32) or cw.tasks.Task.from_pairs(model, ...)"
    if isinstance(obj, str) and obj in _TASK_GENERATORS:
        hint = f"make it first: {name} = cw.tasks.{obj}(model, n=32)"
    elif all(hasattr(obj, f) for f in _DESIDERATUM_FIELDS):
        hint = "a Desideratum is for cw.dcm / DCMWidget; patching takes a Task, " + hint
    raise TypeError(f"{where}: {name} must be a Task ({hint}), got {_got(obj)}")


def check_desideratum(obj: Any, where: str, name: str = "desideratum") -> None:
    """A Desideratum (base and source tokens with targets): one entry of cw.tasks.desiderata,
    or a list of them (trained together)."""
    if all(hasattr(obj, f) for f in _DESIDERATUM_FIELDS):
        return
    if isinstance(obj, (list, tuple)) and obj:
        for i, item in enumerate(obj):
            check_desideratum(item, where, f"{name}[{i}]")
        return
    hint = 'one entry of cw.tasks.desiderata(model, n=200), e.g. des["object_value"]'
    if isinstance(obj, dict):
        hint = f"pick one entry of the dict, one of {sorted(map(str, obj))}"
    raise TypeError(f"{where}: {name} must be a Desideratum ({hint}), got {_got(obj)}")


def check_grid(obj: Any, where: str, name: str = "result") -> None:
    """A HeadGrid-like result (with ``.values``), a 2-D tensor or array, or nested lists."""
    values = getattr(obj, "values", None)
    if values is not None and not callable(values):  # a result object; its shape is checked later
        return
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):  # tensor or array
        return
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(r, (list, tuple)) for r in obj):
        return
    raise TypeError(
        f"{where}: {name} must be a HeadGrid (e.g. cw.activation_patch(model, task)) or a "
        f"[n_layers, n_heads] tensor or array, got {_got(obj)}"
    )


_CHECKS = {
    "model": check_model,
    "base": check_model,
    "finetuned": check_model,
    "tuned": check_model,
    "task": check_task,
    "desideratum": check_desideratum,
    "result": check_grid,
}


def check_args(where: str, **args: Any) -> None:
    """One line at the top of an entry point: ``check_args("cmap", base=base, task=task)``;
    each argument is checked by its name (model/base/finetuned/tuned, task, desideratum, result)."""
    for name, value in args.items():
        _CHECKS[name](value, where, name)
