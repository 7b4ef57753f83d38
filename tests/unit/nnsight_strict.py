"""A local stand-in for NDIF that hands back only what a request saved.

nnsight's ``remote="local"`` simulation serialises a request as for NDIF, but then runs the
block in the caller's own frame: a list made before the ``with`` and appended to inside it
comes back full, although on NDIF the block runs on the server's copy of that list and only
the block's ``.save()``-marked variables travel back (``push_result`` at the outermost
trace, then ``RemoteBackend._push``). ``StrictSimulationBackend`` runs the deserialised
request against its own restored variables, as the server does, and pushes back only the
saved ones, after a ``torch.save`` / ``torch.load`` round trip as the result download does;
while it runs the model's parameters are frozen and circuit_widgets cannot be imported, as
on NDIF's servers.
"""

from __future__ import annotations

import _imp
import io
import linecache
import sys
from typing import Any, ClassVar

import torch
from nnsight.intervention.backends.local import LocalSimulationBackend
from nnsight.tracing.tracer import _saves, save
from nnsight.tracing.util import push

ROOT = "circuit_widgets"


class StrictSimulationBackend(LocalSimulationBackend):
    """Serialise, deserialise with our modules hidden, run the restored tracer on its own
    restored frame (not the caller's), and return only the saved variables."""

    results: ClassVar[list[dict[str, Any]]] = []  # what each request sent back, for tests

    def __call__(self, tracer: Any) -> dict[str, Any]:
        from nnsight.ndif import pull_env
        from nnsight.schema.request import RequestModel

        pull_env()
        blob = RequestModel.serialize(tracer, compress=False)
        persistent = self.model._remoteable_persistent_objects()
        filename = tracer.info.frame.f_code.co_filename
        kept = linecache.cache.get(filename)
        # as NNsightModel's own local simulation: another thread's import waits while our
        # modules are hidden (a widget's worker would otherwise fail to import them)
        _imp.acquire_lock()
        try:
            return self._run(tracer, blob, persistent, filename, kept)
        finally:
            _imp.release_lock()

    def _run(self, tracer: Any, blob: Any, persistent: Any, filename: str, kept: Any) -> dict:
        from nnsight.schema.request import RequestModel

        hidden = self._hide_local_modules()
        try:
            restored = RequestModel.deserialize(blob, persistent, compress=False)
        finally:
            self._restore(hidden)
        # NDIF serves its models with every parameter frozen (requires_grad_(False))
        params = list(self.model._module.parameters())
        grads = [p.requires_grad for p in params]
        # NDIF has no circuit_widgets: nothing of ours may be imported while the block runs
        ours = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] == ROOT}
        paths = list(sys.path)
        sys.path[:] = [p for p in paths if "site-packages" in p or "lib/python" in p]
        try:
            for p in params:
                p.requires_grad_(False)
            # the server's run: the block sees only the shipped copies of the caller's variables
            restored.execute(restored.info.code)
        finally:
            sys.path[:] = paths
            sys.modules.update(ours)
            for p, g in zip(params, grads):
                p.requires_grad_(g)
            if kept is not None:
                linecache.cache[filename] = kept
            else:
                linecache.cache.pop(filename, None)
        saves = _saves()
        result = {k: v for k, v in restored.info.frame.f_locals.items() if id(v) in saves}
        # the server sends the result as torch.save bytes; the client loads them on the cpu
        buf = io.BytesIO()
        torch.save(result, buf)
        buf.seek(0)
        result = torch.load(buf, map_location="cpu", weights_only=False)
        type(self).results.append(dict(result))
        # RemoteBackend._push: mark for an enclosing trace, write into the caller's frame
        for value in result.values():
            save(value)
        push(tracer.info.frame, result)
        return result


def patch_strict(monkeypatch: Any) -> None:
    """Make every ``remote="local"`` NNsightModel request run under the strict backend (the
    original ``backend()`` still counts the request and runs the tests' failure hook)."""
    from circuit_widgets.nnsight_model import NNsightModel

    original = NNsightModel.backend

    def backend(self: NNsightModel) -> Any:
        got = original(self)
        return StrictSimulationBackend(self.lm) if self.remote == "local" else got

    monkeypatch.setattr(NNsightModel, "backend", backend)


def record_requests(monkeypatch: Any, *models: Any) -> list[bytes]:
    """Every request these nnsight models send from now on, serialised as for NDIF (each still
    runs under the local simulation); the list fills as they run."""
    from nnsight.schema.request import RequestModel

    blobs: list[bytes] = []

    class Recording(LocalSimulationBackend):
        def __call__(self, tracer: Any) -> Any:
            blobs.append(RequestModel.serialize(tracer, compress=False))
            return super().__call__(tracer)

    for m in models:
        monkeypatch.setattr(m, "backend", lambda m=m: Recording(m.lm))
    return blobs


def assert_no_module_of_ours(blobs: list[bytes]) -> None:
    """Each request names no module of this package (NDIF could not import it), only the
    nnsight_* modules' source files, for line numbers."""
    for blob in blobs:
        assert b"circuit_widgets.core" not in blob and b"circuit_widgets.tasks" not in blob
        assert blob.count(b"circuit_widgets") == blob.count(b"circuit_widgets/core/nnsight_")
