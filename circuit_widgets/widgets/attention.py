"""AttentionWidget: circuitsvis attention patterns of chosen heads on one example of a task."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import traitlets

from circuit_widgets.core.attention import attention_patterns as core_patterns
from circuit_widgets.core.checks import check_args
from circuit_widgets.types import Circuit, Head
from circuit_widgets.widgets._base import BaseWidget, read_bundle
from circuit_widgets.widgets._model_lock import using
from circuit_widgets.widgets._traits import Float32Array

_IMAGE_WAIT_S = 60.0  # the static image waits this long for the patterns being computed

MAX_HEADS = 32
"""Most heads one view draws (circuitsvis keeps one small heatmap per head)."""


@functools.lru_cache(maxsize=1)
def circuitsvis_source() -> tuple[str, bytes]:
    """(version, text of circuitsvis' bundled browser build), read from the installed package once."""
    try:
        version = metadata.version("circuitsvis")
        spec = importlib.util.find_spec("circuitsvis")  # not an import: the package imports torch
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError("no module named 'circuitsvis'")
        data = (Path(spec.origin).parent / "dist" / "cdn" / "iife.js").read_bytes()
    except (metadata.PackageNotFoundError, ModuleNotFoundError, FileNotFoundError) as exc:
        raise RuntimeError(
            f"circuitsvis' bundled renderer is missing ({exc}); install the package with "
            f"`pip install circuitsvis` (it is a dependency of circuit_widgets[widgets])"
        ) from None
    # The map is large and only a debugger would ask for it: drop the link so nothing fetches it.
    marker = b"//# sourceMappingURL="
    cut = data.rfind(marker)
    if cut != -1:
        data = data[:cut]
    return version, data


def _heads_of(heads: Any, shape: Any) -> list[list[int]]:
    """Sorted unique [layer, head] pairs from a Circuit, Heads, "l.h" strings or pairs."""
    if heads is None:
        return []
    items: Iterable[Any] = heads.heads if isinstance(heads, Circuit) else heads
    if isinstance(items, (str, Head)) or (
        isinstance(items, tuple) and len(items) == 2 and all(isinstance(x, int) for x in items)
    ):
        items = [items]
    out = sorted({Head.parse(tuple(h) if isinstance(h, list) else h) for h in items})
    for h in out:
        shape.check_head(h)
    if len(out) > MAX_HEADS:
        raise ValueError(f"{len(out)} heads selected; the attention view shows at most {MAX_HEADS}")
    return [[h.layer, h.head] for h in out]


def attention_patterns(model: Any, tokens: Any, heads: list[list[int]]) -> np.ndarray:
    """[n_heads, s, s] attention probabilities of ``heads`` ([layer, head] pairs) on one prompt
    ``tokens`` [s], as float32 (computed by core.attention)."""
    result = core_patterns(model, tokens, [Head(layer, head) for layer, head in heads])
    return result.patterns.numpy().astype(np.float32)


class AttentionWidget(BaseWidget):
    """Attention patterns (query x key) of the chosen heads on one example, drawn by circuitsvis.

    Set ``widget.heads`` (a Circuit, Heads or ``"l.h"`` strings) or move the example slider;
    the patterns are computed off the kernel's main thread, the first ones too (``widget.wait()``
    blocks until they are there). On grouped-query models each query head has its own pattern,
    and its label says which key/value head it shares. A saved notebook keeps the static image
    drawn when the widget was displayed: ``IPython.display.Image(widget.to_image())`` shows the
    current one.
    """

    _esm = traitlets.Unicode().tag(sync=True)
    """The view's ES module (circuit_widgets/static/attention.js)."""
    heads = traitlets.List(traitlets.List(traitlets.Int(), minlen=2, maxlen=2)).tag(sync=True)
    """Heads shown, as sorted [layer, head] pairs."""
    example = traitlets.Int(0, min=0).tag(sync=True)
    """Index of the task example shown."""
    n_examples = traitlets.Int(1).tag(sync=True)
    """Number of examples in the task (the slider's range)."""
    prompt = traitlets.Enum(("clean", "corrupt"), default_value="clean").tag(sync=True)
    """Which prompt of the example is run: the clean or the corrupted one."""
    tokens = traitlets.List(traitlets.Unicode()).tag(sync=True)
    """Token strings of the example (its real tokens, no padding); shown as text."""
    patterns = Float32Array(ndim=3).tag(sync=True)
    """[n_heads, s, s] attention probabilities (query, key) of the heads shown, float32."""
    shown = traitlets.List(traitlets.List(traitlets.Int(), minlen=2, maxlen=2)).tag(sync=True)
    """Heads whose patterns ``patterns`` holds (lags ``heads`` while a recompute runs)."""
    head_labels = traitlets.List(traitlets.Unicode()).tag(sync=True)
    """One label per row of ``patterns``, e.g. "L9H6" or "L9H6 (kv 2, shared with 6-8)"."""
    shown_example = traitlets.Int(0).tag(sync=True)
    """Example whose tokens and patterns are shown."""
    title = traitlets.Unicode("").tag(sync=True)
    """Title drawn above the view."""
    circuitsvis_version = traitlets.Unicode("").tag(sync=True)
    """Version of the circuitsvis renderer the kernel serves (the page loads it once)."""

    _trait_kwargs: ClassVar[tuple[str, ...]] = ("layout", "prompt")

    def __init__(
        self,
        model: Any,
        task: Any,
        heads: Any = None,
        example: int = 0,
        *,
        title: str | None = None,
        **kwargs: Any,
    ) -> None:
        self._check_kwargs(kwargs)
        check_args("AttentionWidget", model=model, task=task)
        from circuit_widgets.models import model_shape

        shape = model_shape(model)
        self._model, self._task, self._shape = model, task, shape
        n = len(task)
        if not isinstance(example, int) or isinstance(example, bool) or not 0 <= example < n:
            raise ValueError(
                f"example must be an int in 0-{n - 1} (the task has {n} examples), got {example!r}"
            )
        pairs = _heads_of(heads, shape)
        version, _ = circuitsvis_source()
        prompt = kwargs.pop("prompt", "clean")
        if prompt not in ("clean", "corrupt"):
            raise ValueError(f"prompt must be 'clean' or 'corrupt', got {prompt!r}")
        state = {
            "_esm": read_bundle("attention"),
            "heads": pairs,
            "example": example,
            "n_examples": n,
            "prompt": prompt,
            "title": "" if title is None else str(title),
            "circuitsvis_version": version,
        }
        # Tokens now (no model run); the patterns on the worker: another widget may hold the model.
        toks = self._prompt_tokens(example, prompt)
        n_tok = int(toks.shape[-1])
        state.update(
            tokens=_token_strings(model, toks),
            patterns=np.zeros((0, n_tok, n_tok), np.float32),
            shown=[],
            head_labels=[],
            shown_example=example,
        )
        super().__init__(state, **kwargs)
        self.observe(self._recompute, names=["heads", "example", "prompt"])
        if pairs:
            self._recompute()  # the view says "loading" until the job is done

    # ------------------------------------------------------------------ data

    @traitlets.validate("heads")
    def _valid_heads(self, proposal: dict) -> list[list[int]]:
        return _heads_of(proposal["value"], self._shape)

    @traitlets.validate("example")
    def _valid_example(self, proposal: dict) -> int:
        value, n = proposal["value"], len(self._task)
        if not 0 <= value < n:
            raise traitlets.TraitError(
                f"example must be in 0-{n - 1} (the task has {n} examples), got {value}"
            )
        return value

    @property
    def circuit(self) -> Circuit:
        """The heads shown, as a Circuit."""
        return Circuit.from_heads([Head(layer, head) for layer, head in self.heads])

    @circuit.setter
    def circuit(self, circuit: Any) -> None:
        self.heads = _heads_of(circuit, self._shape)

    def _label(self, layer: int, head: int) -> str:
        g = self._shape.group_size
        if g == 1:
            return f"L{layer}H{head}"
        kv = head // g
        return f"L{layer}H{head} (kv {kv}, shared by q{kv * g}-{kv * g + g - 1})"

    def _prompt_tokens(self, example: int, prompt: str) -> Any:
        task = self._task
        length = int(task.lengths[example])
        return (task.clean_tokens if prompt == "clean" else task.corrupt_tokens)[example, :length]

    def _compute(self, heads: list[list[int]], example: int, prompt: str) -> dict[str, Any]:
        toks = self._prompt_tokens(example, prompt)
        with using(self._model):
            patterns = attention_patterns(self._model, toks, heads)
        return {
            "tokens": _token_strings(self._model, toks),
            "patterns": patterns,
            "shown": heads,
            "head_labels": [self._label(layer, head) for layer, head in heads],
            "shown_example": example,
        }

    def _recompute(self, change: dict | None = None) -> None:
        heads, example, prompt = list(self.heads), self.example, self.prompt
        self._submit(lambda job: self._compute(heads, example, prompt))

    def refresh(self):
        """Recompute the patterns now (off the main thread); returns the Job."""
        self._recompute()
        return self._job

    def _on_result(self, result: Any) -> None:
        with self.hold_sync():
            for name, value in result.items():
                setattr(self, name, value)

    def _on_custom_msg(self, kind: Any, content: Any, buffers: list) -> None:
        if kind == "circuitsvis":
            # Asked once per page (the first view to render): the renderer travels as one buffer.
            version, data = circuitsvis_source()
            self.send({"type": "circuitsvis", "version": version}, [data])

    # ------------------------------------------------------------------ static image

    def figure(self):
        """The patterns as a matplotlib Figure (see circuit_widgets.plots.plot_attention)."""
        from circuit_widgets.plots import plot_attention

        job = self._job
        if self.heads and self.shown != self.heads and job is not None:
            job.wait(_IMAGE_WAIT_S)  # displayed before its first patterns landed: draw those
        title = self.title or f"attention, example {self.shown_example} ({self.prompt})"
        if self.heads and not self.shown:
            title += " (patterns not computed yet)"
        return plot_attention(self.patterns, self.tokens, self.head_labels, title=title)

    def _png_key(self) -> Any:
        return (self.patterns.tobytes(), tuple(self.tokens), tuple(self.head_labels), self.title)

    def __repr__(self) -> str:
        return (
            f"AttentionWidget(example {self.shown_example} of {self.n_examples}, "
            f"{len(self.tokens)} tokens, heads {', '.join(f'{l}.{h}' for l, h in self.shown) or '(none)'})"
        )


def _token_strings(model: Any, tokens: Any) -> list[str]:
    tok = getattr(model, "tokenizer", None)
    ids = [int(t) for t in tokens]
    if tok is not None and hasattr(tok, "convert_ids_to_tokens"):
        # Decode one id at a time: byte-level BPE pieces read as text (" Mary", not "ĠMary").
        return [tok.decode([i]) for i in ids]
    return [str(i) for i in ids]
