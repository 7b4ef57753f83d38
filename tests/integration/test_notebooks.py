"""Every teaching notebook runs top to bottom on the demo model; its assertion cells must pass.

Notebook convention (all notebooks; see notebooks/README.md):

- The environment variable ``CIRCUIT_WIDGETS_NOTEBOOK_MODE`` is ``full`` (the default: what a
  person and ``bash scripts/dev notebooks`` run; the committed outputs come from it) or
  ``quick`` (CI, this test: smaller n, the same code path).
- Each notebook reads it in its first code cell:
  ``QUICK = os.environ.get("CIRCUIT_WIDGETS_NOTEBOOK_MODE", "full") == "quick"`` and sizes its
  runs from ``QUICK``.
- Notebooks are committed with their executed full-mode outputs. Every number quoted in a
  markdown cell is printed by a code cell above it and checked by an assertion cell: against
  the quoted value with a tolerance in full mode, by sanity checks only in quick mode.
- In quick mode a notebook runs in well under 3 minutes on a busy 2-core machine (no cell near
  nbclient's 600 s limit).

Run as a script, this file re-executes notebooks in place (full mode unless told):
``python tests/integration/test_notebooks.py [--quick] [NOTEBOOK ...]``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MODE_VAR = "CIRCUIT_WIDGETS_NOTEBOOK_MODE"
TIMES = ROOT / "test-output" / "notebook_times.json"  # wall seconds per notebook, quick mode


def execute(path: Path, mode: str, timeout: int = 600, nb=None):
    """Run a notebook (``nb``, else read from ``path``) top to bottom in ``mode`` ("full" or
    "quick"); returns it with its outputs (raises CellExecutionError, with the cell and
    traceback, on any failure; ``nb`` then holds the outputs so far)."""
    import nbformat
    from nbclient import NotebookClient

    if mode not in ("full", "quick"):
        raise ValueError(f"mode must be 'full' or 'quick', got {mode!r}")
    nb = nbformat.read(path, as_version=4) if nb is None else nb
    before = os.environ.get(MODE_VAR)
    os.environ[MODE_VAR] = mode  # the kernel inherits this process's environment
    try:
        client = NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(path.parent)}},
        )
        client.execute()
    finally:
        if before is None:
            os.environ.pop(MODE_VAR, None)
        else:
            os.environ[MODE_VAR] = before
    return nb


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path):
    t0 = time.perf_counter()
    nb = execute(path, "quick")
    seconds = time.perf_counter() - t0
    TIMES.parent.mkdir(exist_ok=True)
    times = json.loads(TIMES.read_text()) if TIMES.is_file() else {}
    TIMES.write_text(json.dumps({**times, path.name: round(seconds, 1)}, indent=1))
    print(f"{path.name}: {seconds:.0f} s")
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_follows_the_convention(path):
    """The first code cell reads the mode; the committed notebook holds its executed outputs."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert MODE_VAR in first.source and "QUICK" in first.source
    assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
        f"{path.name} is committed without outputs: run `bash scripts/dev notebooks`"
    )


def main(argv: list[str]) -> int:
    """Re-execute notebooks in place (full mode, or quick with --quick), saving their outputs."""
    import nbformat

    mode = "quick" if "--quick" in argv else "full"
    paths = [Path(a) for a in argv if not a.startswith("--")] or NOTEBOOKS
    failed = []
    for path in paths:
        t0 = time.perf_counter()
        print(f"executing {path} ({mode} mode)", flush=True)
        nb = nbformat.read(path, as_version=4)
        try:
            execute(path, mode, timeout=-1 if mode == "full" else 600, nb=nb)
        except Exception as e:  # noqa: BLE001 - keep what ran, with the error in its cell
            failed.append(path)
            print(f"  FAILED: {type(e).__name__}: {str(e)[-2000:]}", flush=True)
        nbformat.write(nb, path)
        print(f"  wrote {path} in {time.perf_counter() - t0:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
