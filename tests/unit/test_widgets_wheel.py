"""The built wheel carries the widgets' JavaScript, and a widget renders from the installed wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "circuit_widgets" / "static"

pytestmark = pytest.mark.slow


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, (
        f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if shutil.which("npm") is None and not any(STATIC.glob("*.js")):
        pytest.skip("npm is not installed and circuit_widgets/static/ has no built bundle")
    out = tmp_path_factory.mktemp("dist")
    # Builds through hatchling (fetched into pip's isolated build env) and hatch_build.py.
    _run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-w", str(out), "-q"])
    (whl,) = out.glob("circuit_widgets-*.whl")
    return whl


def test_wheel_lists_the_js_bundles(wheel):
    entries = json.loads((ROOT / "js" / "package.json").read_text())["circuitWidgets"]["entries"]
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for entry in entries:
            name = f"circuit_widgets/static/{entry}.js"
            assert name in names, f"{name} missing from {wheel.name}: {sorted(names)}"
            assert zf.read(name) == (STATIC / f"{entry}.js").read_bytes()
    assert not any(n.startswith(("js/", "tests/", "hatch_build")) for n in names)


def test_widget_renders_from_the_installed_wheel(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            str(wheel),
        ]
    )
    # Borrow torch, anywidget, ... from this venv's site-packages as a plain path entry: .pth
    # files there (the editable install of circuit_widgets) are not processed, and the fresh
    # venv's own site-packages, holding the wheel, comes first.
    site = Path(
        _run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
        ).stdout.strip()
    )
    (site / "_borrow_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    script = r"""
import json, sys
from importlib import resources
import torch
import circuit_widgets
from circuit_widgets.widgets import HeadGridWidget

values = torch.arange(12, dtype=torch.float32).reshape(3, 4) - 6
values[0, 0] = float("nan")
w = HeadGridWidget(values, title="from the wheel", selection=["1.2"])
bundle = (resources.files("circuit_widgets") / "static" / "head_grid.js").read_text()
data, _ = w._repr_mimebundle_()
print(json.dumps({
    "file": circuit_widgets.__file__,
    "esm_is_bundle": w._esm == bundle,
    "esm_len": len(w._esm),
    "mime": sorted(data),
    "circuit": str(w.circuit),
}))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", MPLBACKEND="Agg", PYTHONNOUSERSITE="1")
    out = _run([str(py), "-c", script], cwd=tmp_path, env=env)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(report["file"]).resolve().is_relative_to(venv.resolve()), report["file"]
    assert report["esm_is_bundle"] and report["esm_len"] > 1000
    assert report["mime"] == ["application/vnd.jupyter.widget-view+json", "image/png", "text/plain"]
    assert report["circuit"] == "Circuit(heads@all: 1.2)"
