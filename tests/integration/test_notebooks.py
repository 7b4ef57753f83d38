"""Every teaching notebook runs top to bottom on the demo model; its assertion cells must pass."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TIMES = (
    ROOT / "test-output" / "notebook_times.json"
)  # wall seconds per notebook, for the 10-minute budget


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any failure
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
