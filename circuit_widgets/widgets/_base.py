"""BaseWidget: strict keyword arguments, status/progress/error traits, one background worker."""

from __future__ import annotations

import base64
import contextlib
import difflib
import inspect
import logging
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import resources
from typing import Any, ClassVar

import anywidget
import traitlets

from circuit_widgets.widgets._model_lock import _MODEL_LOCKS, ModelHold, using

# The model-lock names moved to _model_lock; listed here so imports written against _base work.
__all__ = [
    "_MODEL_LOCKS",
    "BaseWidget",
    "BundleMissingError",
    "Job",
    "JobCancelled",
    "ModelHold",
    "read_bundle",
    "using",
]

logger = logging.getLogger(__name__)

_BUILD_HINT = (
    "run `bash scripts/dev setup`, or `cd js && npm ci && npm run build`, in the source checkout"
)


class BundleMissingError(RuntimeError):
    """The widget's built JavaScript is not in circuit_widgets/static/."""


def read_bundle(name: str) -> str:
    """Text of circuit_widgets/static/<name>.js, the ESM a widget's view runs."""
    path = resources.files("circuit_widgets") / "static" / f"{name}.js"
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BundleMissingError(
            f"the widget front end {path} has not been built (an editable install from a git "
            f"checkout does not build it); {_BUILD_HINT}"
        ) from None


class JobCancelled(Exception):
    """Raised by Job.check() inside a job that was asked to stop."""


class Job:
    """What a background job sees: its cancel flag, progress reporting and its partial result."""

    def __init__(self, widget: BaseWidget) -> None:
        self._widget = widget
        self._cancel = threading.Event()
        self.future: Future | None = None
        self.partial: Any = None
        """Latest partial result the job reported (kept when it is cancelled or fails)."""
        self.result: Any = None
        """The job's return value once it finished normally."""
        self.exception: BaseException | None = None
        """The exception that ended the job, if any."""
        self.traceback: str = ""
        """Formatted traceback of that exception."""
        self._shown: Any = None  # the partial result last put on screen

    @property
    def cancelled(self) -> bool:
        """True once cancel() was called; a job checks this between batches."""
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self.future is not None and self.future.done()

    def cancel(self) -> None:
        self._cancel.set()
        if self.future is not None and self.future.cancel():  # never started
            self._widget._finish(self, "cancelled")

    def check(self) -> None:
        """Raise JobCancelled if the job was cancelled (call it between batches)."""
        if self._cancel.is_set():
            raise JobCancelled()

    def report(self, progress: float | None = None, partial: Any = None) -> None:
        """Publish progress (0..1) and/or a partial result to the widget."""
        widget = self._widget
        with widget._job_lock:  # ownership check and update in one step: no new run in between
            if partial is not None:
                self.partial = partial
            if not widget._owned_by(self):
                return  # a newer job owns the widget's traits now
            if partial is not None:
                widget._on_partial(partial)
                self._shown = partial
            if progress is not None:
                widget.progress = min(1.0, max(0.0, float(progress)))

    def set(self, **traits: Any) -> None:
        """Set widget traits from the job, unless a newer job owns the widget by now."""
        widget = self._widget
        with widget._job_lock:
            if widget._owned_by(self):
                with widget.hold_sync():
                    for name, value in traits.items():
                        setattr(widget, name, value)

    def stopper(self, hold: ModelHold | None = None) -> Callable[[], bool]:
        """A core function's ``should_stop``: called between batches, it first hands the held
        models to any widget waiting for them (so it waits one batch, not a whole run)."""

        def should_stop() -> bool:
            if hold is not None:
                hold.handover()
            return self._cancel.is_set()

        return should_stop

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the job ends; return its result (or its partial result if it did not finish)."""
        if self.future is not None:
            # A cancelled future raises here; the outcome is recorded on the Job either way.
            with contextlib.suppress(Exception):
                self.future.result(timeout)
        return self.result if self.result is not None else self.partial


class BaseWidget(anywidget.AnyWidget):
    """Base of circuit_widgets' widgets.

    Refuses unknown keyword arguments with a TypeError, and runs long jobs on a single
    background worker (``_submit``) that reports progress and can be cancelled.
    """

    status = traitlets.Enum(
        ("idle", "running", "done", "cancelled", "error"), default_value="idle"
    ).tag(sync=True)
    """State of the background job: idle, running, done, cancelled or error."""
    progress = traitlets.Float(0.0, min=0.0, max=1.0).tag(sync=True)
    """Progress of the running job, 0..1."""
    error = traitlets.Unicode("").tag(sync=True)
    """Message of the exception that ended the last job ("" if none)."""
    message = traitlets.Unicode("").tag(sync=True)
    """A note on the current job for the status line, e.g. why it shows no preview ("" if none)."""

    _trait_kwargs: ClassVar[tuple[str, ...]] = ("layout",)
    """Traits a user may set through the constructor, besides its named parameters."""
    _run_action: ClassVar[str | None] = None
    """The method a front-end Run click calls (e.g. "run", "train"); None: no Run button."""
    # Class-level defaults so close() (also called from __del__) works on a half-built widget.
    _job: Job | None = None
    _executor: ThreadPoolExecutor | None = None
    _png_cache: tuple[Any, bytes] | None = None
    _closed = False
    _refused = False  # the last Run click was refused for its settings (status "error")
    _job_lock = threading.RLock()  # replaced per instance; a class default for half-built widgets

    def __init__(self, _state: dict | None = None, **kwargs: Any) -> None:
        self._check_kwargs(kwargs)
        self._executor_lock = threading.Lock()
        self._job_lock = threading.RLock()
        super().__init__(**(_state or {}), **kwargs)
        self.on_msg(self._on_front_end_msg)

    # ------------------------------------------------------------------ front-end messages

    def _on_front_end_msg(self, widget: Any, content: Any, buffers: list) -> None:
        """The view's messages: Run (settings that cannot run are shown in the widget), Cancel,
        and anything else for the subclass (``_on_custom_msg``)."""
        kind = content.get("type") if isinstance(content, dict) else None
        if kind == "run" and self._run_action is not None:
            self._run_from_front_end(getattr(self, self._run_action))
        elif kind == "cancel":
            self.cancel()
        else:
            self._on_custom_msg(kind, content, buffers)

    def _on_custom_msg(self, kind: Any, content: Any, buffers: list) -> None:
        """A message of the subclass's own view (a hook; unknown messages are ignored)."""

    # ------------------------------------------------------------------ static image

    def figure(self):
        """The widget's current state as a matplotlib Figure."""
        raise NotImplementedError(f"{type(self).__name__} has no static figure")

    def to_image(self, format: str = "png", dpi: int = 100) -> bytes:
        """PNG (or SVG) bytes of the static figure, for reports and non-widget front ends."""
        from circuit_widgets.plots import figure_bytes

        return figure_bytes(self.figure(), fmt=format, dpi=dpi)

    def _png_key(self) -> Any:
        """What the static PNG depends on, to reuse it while unchanged; None: redraw each time."""
        return None

    def _png(self) -> bytes:
        key = self._png_key()
        if key is None or self._png_cache is None or self._png_cache[0] != key:
            self._png_cache = (key, self.to_image("png", dpi=80))
        return self._png_cache[1]

    def _repr_mimebundle_(self, **kwargs: Any):
        bundle = super()._repr_mimebundle_(**kwargs)
        if bundle is None:
            return None
        data, metadata = bundle if isinstance(bundle, tuple) else (bundle, {})
        # Front ends without the widget manager (nbconvert, GitHub, VS Code previews) show this.
        data["image/png"] = base64.b64encode(self._png()).decode("ascii")
        return data, metadata

    # ------------------------------------------------------------------ keyword arguments

    @classmethod
    def valid_kwargs(cls) -> list[str]:
        """Keyword arguments the constructor accepts."""
        params = inspect.signature(cls.__init__).parameters.values()
        named = {
            p.name
            for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and not p.name.startswith("_")
            and p.name != "self"
        }
        return sorted(named | set(cls._trait_kwargs))

    @classmethod
    def _check_kwargs(cls, kwargs: dict) -> None:
        valid = cls.valid_kwargs()
        unknown = [k for k in kwargs if k not in valid]
        if not unknown:
            return
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, valid, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise TypeError(
            f"{cls.__name__}() got unexpected keyword argument{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(hints)}; valid keyword arguments are: {', '.join(valid)}"
        )

    # ------------------------------------------------------------------ background work

    def _submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Job:
        """Run ``fn(job, *args, **kwargs)`` on this widget's single worker thread.

        A running job is cancelled first; the worker runs jobs one after another. ``fn`` calls
        ``job.check()`` (or reads ``job.cancelled``) between batches and ``job.report(...)``
        to publish progress and partial results. Its return value is passed to ``_on_result``;
        if it is cancelled, its returned (or last reported) partial result is shown.
        """
        job = Job(self)
        with self._job_lock:  # an old job's report() lands before the swap, never after it
            old = self._job
            if old is not None and not old.done:
                old.cancel()
            self._job = job
            self._refused = False
            with self.hold_sync():
                self.error = ""
                self.message = ""
                self.progress = 0.0
                self.status = "running"
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="circuit_widgets"
                )
            job.future = self._executor.submit(self._run_job, job, fn, args, kwargs)
        return job

    def _run_from_front_end(self, start: Callable[[], Any]) -> None:
        """A Run click: settings that cannot run are shown in the widget, where the click happened,
        and the message goes once the user changes what it was about (``_inputs_changed``)."""
        try:
            start()
        except ValueError as exc:
            with self.hold_sync():
                self.error = str(exc)
                self.message = ""  # a note of an earlier run would read as if about this one
                self.status = "error"
            self._refused = True

    def _inputs_changed(self, change: Any = None) -> None:
        """Clear a refused Run's message: it described settings that no longer hold."""
        if self._refused and self.status == "error":
            with self.hold_sync():
                self.error = ""
                self.status = "idle"
        self._refused = False

    def _owned_by(self, job: Job) -> bool:
        """True while ``job`` is this widget's current job (call it holding ``_job_lock``)."""
        return self._job is job and not self._closed

    def _run_job(self, job: Job, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        try:
            if job.cancelled:
                self._finish(job, "cancelled")
                return
            try:
                value = fn(job, *args, **kwargs)
            except JobCancelled:
                value, stopped = None, True
            else:
                stopped = job.cancelled
            if stopped:
                if value is not None:
                    job.partial = value
                with self._job_lock:
                    # the last partial (a stopped sweep's return value) may not be on screen yet
                    if (
                        self._owned_by(job)
                        and job.partial is not None
                        and job.partial is not job._shown
                    ):
                        self._on_partial(job.partial)
                        job._shown = job.partial
                    self._finish(job, "cancelled")
            else:
                job.result = value
                with self._job_lock:
                    if self._owned_by(job):
                        self._on_result(value)
                    self._finish(job, "done")
        except Exception as exc:  # noqa: BLE001 - the widget shows it instead of losing it in a thread
            # Also a failure while showing the result (e.g. a user's observer): never stuck "running".
            job.exception = exc
            job.traceback = traceback.format_exc()
            logger.debug("background job failed\n%s", job.traceback)
            try:
                self._finish(job, "error", f"{type(exc).__name__}: {exc}")
            except Exception:
                logger.exception("could not report a failed job in the widget")

    def _finish(self, job: Job, status: str, error: str = "") -> None:
        with self._job_lock:
            if self._job is not job:
                return  # superseded by a newer job: leave its traits alone
            with self.hold_sync():
                if status == "done":
                    self.progress = 1.0
                self.error = error
                self.status = status

    def _on_partial(self, partial: Any) -> None:
        """Show a partial result (a subclass hook; called on the worker thread)."""

    def _on_result(self, result: Any) -> None:
        """Show a finished result (a subclass hook; called on the worker thread)."""

    def cancel(self) -> bool:
        """Ask the running job to stop after its current batch; True if there was one."""
        job = self._job
        if job is None or job.done:
            return False
        job.cancel()
        return True

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the current job ends; return its result (or partial result)."""
        return self._job.wait(timeout) if self._job is not None else None

    def _children(self) -> list[Any]:
        """Our widgets this one shows (grid, attention, tabs): closed with it. Not ``layout``,
        which a user may share between widgets."""
        values = getattr(self, "_trait_values", {})  # a half-built widget (from __del__) has few
        return [v for v in list(values.values()) if isinstance(v, BaseWidget) and v is not self]

    def close(self) -> None:
        self.cancel()
        self._closed = True  # the worker's last batch must not write into closed views
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        for child in self._children():
            child.close()
        super().close()
