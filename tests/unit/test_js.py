"""The front end's own unit tests (vitest: codecs, colour scale, selection), run from pytest
so the README's one test command covers them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

JS = Path(__file__).resolve().parents[2] / "js"


def test_vitest_suite_passes():
    if shutil.which("npm") is None or not (JS / "node_modules").is_dir():
        pytest.skip("npm or js/node_modules missing: run `bash scripts/dev setup`")
    proc = subprocess.run(
        ["npm", "test", "--silent"],
        cwd=JS,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout
