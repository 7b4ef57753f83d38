"""Browser tests: an isolated JupyterLab server and headless Chromium (Debian's, offline).

Follows the recipe in ../shared/recipes/jupyterlab-browser-test (relative to the project root):
nothing is written to ~, the server
and its kernels are stopped by PID, and Playwright drives /usr/bin/chromium (never
`playwright install`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OUTPUT = ROOT / "test-output" / "ui"
CHROMIUM = os.environ.get("CHROMIUM_PATH") or "/usr/bin/chromium"
TOKEN = "ui-test-token"  # the server only listens on 127.0.0.1
CHROMIUM_ARGS = [
    "--no-sandbox",  # root in a container
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SERVER_CONFIG = """
c.LabApp.news_url = None
c.LabApp.check_for_updates_class = "jupyterlab.NeverCheckForUpdate"
"""
LAB_SETTINGS = {  # no news-consent toast over the notebook
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def chromium_path() -> str:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(
            f"no Chromium at {CHROMIUM} (Debian: apt-get install -y chromium; `bash scripts/dev setup` does it)"
        )
    pytest.importorskip(
        "playwright.sync_api", reason="the playwright Python package is not installed"
    )
    return CHROMIUM


@pytest.fixture(scope="session")
def output_dir() -> Path:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    return OUTPUT


@pytest.fixture(scope="session")
def jupyter_lab(chromium_path, tmp_path_factory):
    """A JupyterLab server on a free port with its own config/data/runtime dirs.

    Yields ``(base_url, root_dir)``; tests write their notebooks into root_dir.
    """
    psutil = pytest.importorskip("psutil")
    tmp = tmp_path_factory.mktemp("lab")
    root = tmp / "root"
    root.mkdir()
    home = tmp / "home"
    for d in ("config", "data", "runtime", "ipython", "settings", "workspaces"):
        (home / d).mkdir(parents=True)
    (home / "config" / "jupyter_server_config.py").write_text(SERVER_CONFIG)
    for rel, value in LAB_SETTINGS.items():
        f = home / "settings" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(value))
    env = dict(
        os.environ,
        JUPYTER_CONFIG_DIR=str(home / "config"),
        JUPYTER_DATA_DIR=str(home / "data"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        IPYTHONDIR=str(home / "ipython"),
        JUPYTERLAB_SETTINGS_DIR=str(home / "settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
        MPLBACKEND="Agg",
        HF_HUB_OFFLINE="1",
        CIRCUIT_WIDGETS_CACHE=os.environ.get("CIRCUIT_WIDGETS_CACHE", str(tmp / "cache")),
    )
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp / "jupyter.log"
    log = open(log_path, "w")  # noqa: SIM115 - held open for the server's lifetime
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={port}",
            "--port-retries=0",
            f"--ServerApp.root_dir={root}",
            f"--IdentityProvider.token={TOKEN}",
            "--ServerApp.password=",
            "--allow-root",
        ],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited early:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={TOKEN}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("jupyter lab did not answer /api/status within 60 s")
            time.sleep(0.2)
        yield base, root
    finally:
        _stop_server(proc, base, psutil)
        log.close()
        if OUTPUT.is_dir():
            shutil.copy(log_path, OUTPUT / "jupyter.log")


def _stop_server(proc: subprocess.Popen, base: str, psutil) -> None:
    """POST /api/shutdown (stops the kernels too), then SIGTERM/SIGKILL by PID; leftover kernels by PID."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    try:
        req = urllib.request.Request(f"{base}/api/shutdown?token={TOKEN}", method="POST")
        urllib.request.urlopen(req, timeout=5).close()
    except OSError:
        pass
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _, alive = psutil.wait_procs(children, timeout=10)
    for p in alive:  # only processes our server started
        p.kill()


@pytest.fixture(scope="session")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="session")
def open_notebook():
    """``open_notebook(browser, base_url, name)``: see _open_notebook."""
    return _open_notebook


@pytest.fixture(scope="session")
def write_notebook():
    """``write_notebook(path, cells)``: see _write_notebook."""
    return _write_notebook


def _write_notebook(path: Path, cells: list[str]) -> None:
    """A python3 notebook of these code cells, for a test to open."""
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    nbformat.write(nb, path)


def _open_notebook(browser, base: str, name: str, *, viewport=(1280, 1100)):
    """Open a notebook, wait until its kernel is attached and idle, and Run All.

    Returns ``(page, console_messages, dialogs)``. Waits for the status bar's
    "Python 3 (ipykernel) | Idle" (not the toolbar indicator, which reads idle before the
    kernel is attached; see the recipe).
    """
    from playwright.sync_api import expect

    page = browser.new_page(
        viewport={"width": viewport[0], "height": viewport[1]}, accept_downloads=True
    )
    page.set_default_timeout(30_000)
    expect.set_options(timeout=30_000)
    console: list[str] = []
    dialogs: list[str] = []
    page.on("console", lambda m: console.append(f"console.{m.type}: {m.text}"))
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))

    def on_dialog(d):
        dialogs.append(f"{d.type}: {d.message}")
        d.dismiss()

    page.on("dialog", on_dialog)
    kernel_dialog = page.locator(".jp-Dialog").filter(has_text="Select Kernel")
    page.add_locator_handler(
        kernel_dialog, lambda d: d.locator(".jp-Dialog-button.jp-mod-accept").click()
    )

    # ?reset: a fresh workspace, so an earlier test's notebook tab is not restored beside this one
    page.goto(f"{base}/lab/tree/{name}?reset&token={TOKEN}")
    expect(page.locator(".jp-NotebookPanel .jp-Notebook")).to_be_visible()
    expect(page.locator("#jp-main-statusbar")).to_contain_text("Python 3 (ipykernel) | Idle")
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    return page, console, dialogs
